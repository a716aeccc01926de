"""Training-side helper: how long training waits for each batch, and prefetch hints.

    from sidecar.loader import instrument, epoch_paths

    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=8)
    loader = instrument(loader, hints=epoch_paths(loader, lambda i: dataset.files[i]))
    for epoch in range(epochs):
        for batch in loader:        # each batch's wait is reported to the sidecar
            ...

- `instrument(iterable, url=..., hints=...)` wraps any iterable (a DataLoader, a generator
  factory): every `iter()` is an epoch; the time each `next()` takes is a batch wait,
  reported to the sidecar (POST /v1/batch-wait) several at a time from a background thread.
- `hints`: None, a list of paths (sent at the start of every epoch), or a callable returning
  the epoch's ordered paths (called at the start of every epoch, before the loader draws its
  order). `epoch_paths(loader, path_of)` is such a callable: it draws the sampler's order for
  the coming epoch and pins the DataLoader to exactly that order, so the sidecar prefetches
  the files in the order the workers will read them.
- Paths may be absolute under the mount (as the training container sees it: pass `mount=`
  or set DDA_MOUNT) or relative to the mount's root.

Fails soft: nothing here raises into training. If the sidecar is unreachable the reports are
dropped (bounded queue, ~0.5 s timeouts, in a background thread). No torch import.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import time
import urllib.request
from typing import Any, Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:9400"


class _Reporter:
    """One background thread per sidecar URL: batches batch-wait observations, sends hints,
    never blocks the caller (bounded queue; when full, observations are dropped)."""

    def __init__(self, url: str, timeout: float = 0.5, flush_every: float = 1.0, max_batch: int = 512,
                 max_queue: int = 100_000):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.flush_every = flush_every
        self.max_batch = max_batch
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue(max_queue)
        self.dropped = 0
        self.sent = 0
        self.failures = 0
        self.last_hint_reply: dict[str, Any] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy
        self._down_until = 0.0
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="dda-loader-reporter", daemon=True)
        self._thread.start()

    # -- caller side (training thread) --------------------------------------------------------------
    def observe(self, seconds: float) -> None:
        self._put(("wait", seconds))

    def hint(self, paths: list[str]) -> None:
        self._put(("hints", paths))

    def flush(self, timeout: float = 2.0) -> bool:
        """Send what is queued now; wait at most `timeout` seconds. True when all was handled."""
        done = threading.Event()
        if not self._put(("flush", done)):
            return False
        return done.wait(timeout)

    def _put(self, item: tuple[str, Any]) -> bool:
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    # -- background thread ------------------------------------------------------------------------
    def _run(self) -> None:
        waits: list[float] = []
        next_send = time.monotonic() + self.flush_every
        while True:
            try:
                kind, value = self.queue.get(timeout=max(0.0, next_send - time.monotonic()))
            except queue.Empty:
                kind, value = "tick", None
            try:
                if kind == "wait":
                    waits.append(value)
                if kind == "hints":
                    self._send_waits(waits)
                    reply = self._post("/v1/hints", {"paths": value})
                    if reply is not None:
                        self.last_hint_reply = reply
                if kind in ("tick", "flush") or len(waits) >= self.max_batch or time.monotonic() >= next_send:
                    self._send_waits(waits)
                    next_send = time.monotonic() + self.flush_every
            except Exception as err:   # never die: the reporter outlives any one failure
                log.debug("dda loader reporter: %r", err)
            finally:
                if kind == "flush":
                    value.set()

    def _send_waits(self, waits: list[float]) -> None:
        while waits:
            batch = waits[:self.max_batch]
            del waits[:self.max_batch]
            if self._post("/v1/batch-wait", {"seconds": batch}) is not None:
                self.sent += len(batch)

    def _post(self, path: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        now = time.monotonic()
        if now < self._down_until:
            self.failures += 1
            return None
        request = urllib.request.Request(self.url + path, data=json.dumps(doc).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except Exception as err:
            self.failures += 1
            self._down_until = time.monotonic() + 5.0    # do not knock on a closed door every batch
            if not self._warned:
                self._warned = True
                log.warning("dda: sidecar at %s unreachable (%s); training continues without reporting",
                            self.url, err)
            return None


def _setting(name: str) -> Any:
    """A setting from the environment (sidecar.settings: DDA_SIDECAR_URL, DDA_MOUNT); never raises."""
    try:
        from .settings import from_env

        return from_env(name)
    except Exception:  # noqa: BLE001 - the loader never raises into training
        return None


_reporters: dict[str, _Reporter] = {}
_reporters_lock = threading.Lock()


def reporter(url: str | None = None) -> _Reporter:
    url = (url or _setting("sidecar_url") or DEFAULT_URL).rstrip("/")
    with _reporters_lock:
        found = _reporters.get(url)
        if found is None or not found._thread.is_alive():   # e.g. after a fork
            found = _reporters[url] = _Reporter(url)
        return found


@atexit.register
def _flush_all() -> None:
    for rep in list(_reporters.values()):
        try:
            rep.flush(1.0)
        except Exception:
            pass


def _relative(paths: Iterable[Any], mount: str | None) -> list[str]:
    out = []
    prefix = mount.rstrip("/") + "/" if mount else None
    for p in paths:
        text = os.fspath(p) if not isinstance(p, str) else p
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
        out.append(text)
    return out


class Instrumented:
    """What `instrument()` returns: iterate it once per epoch, like the wrapped loader."""

    def __init__(self, iterable: Iterable[Any], url: str | None, hints: Any, mount: str | None):
        self.iterable = iterable
        self.hints = hints
        self.mount = mount if mount is not None else _setting("mount")
        self.reporter = reporter(url)

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:   # loader.dataset, loader.batch_size, ...
        return getattr(self.iterable, name)

    def _send_hints(self) -> None:
        try:
            hints = self.hints() if callable(self.hints) else self.hints
            if hints is not None:
                self.reporter.hint(_relative(hints, self.mount))
        except Exception as err:
            log.warning("dda: could not compute prefetch hints (%r); continuing without", err)

    def __iter__(self) -> Iterator[Any]:
        if self.hints is not None:
            self._send_hints()
        it = iter(self.iterable)
        observe = self.reporter.observe
        clock = time.perf_counter
        while True:
            started = clock()
            try:
                item = next(it)
            except StopIteration:
                break
            try:
                observe(clock() - started)
            except Exception:
                pass
            yield item
        self.reporter.flush(0)   # send the epoch's tail now (without waiting)


def instrument(iterable: Iterable[Any], url: str | None = None, hints: Any = None, *,
               mount: str | None = None) -> Instrumented:
    """Wrap `iterable` (a DataLoader): time each batch's arrival, report it to the sidecar at
    `url` (default $DDA_SIDECAR_URL or http://127.0.0.1:9400), and send `hints` at the start of
    each epoch (None, a path list, or a callable returning one, e.g. `epoch_paths(...)`)."""
    return Instrumented(iterable, url, hints, mount)


# -- the sampler's order, without importing torch -------------------------------------------------
class _PinnedOrder:
    """Stands in for a DataLoader's sampler inside its BatchSampler: replays the order drawn
    for the coming epoch (so hints and reads agree), else draws from the original."""

    def __init__(self, original: Any):
        self.original = original
        self.pending: list[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        order, self.pending = self.pending, None
        return iter(order) if order is not None else iter(self.original)

    def __len__(self) -> int:
        return len(self.original)

    def __getattr__(self, name: str) -> Any:   # set_epoch() of a DistributedSampler, ...
        return getattr(self.original, name)


def _default_path_of(dataset: Any) -> Callable[[Any], Any]:
    for attr in ("samples", "imgs"):               # torchvision ImageFolder / DatasetFolder
        items = getattr(dataset, attr, None)
        if isinstance(items, list) and items and isinstance(items[0], tuple):
            return lambda i, items=items: items[i][0]
    for attr in ("paths", "files", "filenames"):
        items = getattr(dataset, attr, None)
        if isinstance(items, (list, tuple)):
            return lambda i, items=items: items[i]
    raise TypeError("cannot tell the file of a dataset index: pass path_of=lambda i: ...")


def epoch_order(loader: Any) -> list[Any] | None:
    """The indices the DataLoader will read next epoch, in order, with the loader pinned to
    them. None when the order cannot be known in advance (an iterable-style dataset, or a
    custom random batch sampler without a `sampler` to pin)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else None
    if batch_sampler is not None and inner is not None:
        if not isinstance(inner, _PinnedOrder):
            inner = _PinnedOrder(inner)
            batch_sampler.sampler = inner     # BatchSampler is a plain object; the DataLoader is untouched
        inner.pending = list(iter(inner.original))
        return list(inner.pending)
    sampler = getattr(loader, "sampler", None)
    if sampler is None or type(sampler).__name__ not in ("SequentialSampler", "DistributedSampler"):
        return None   # deterministic samplers only: drawing a random one would not predict the loader
    return list(iter(sampler))


def epoch_paths(loader: Any, path_of: Callable[[Any], Any] | None = None) -> Callable[[], list[Any] | None]:
    """A `hints=` callable for `instrument`: each epoch, the loader's coming order as paths."""
    warned = [False]

    def hints() -> list[Any] | None:
        order = epoch_order(loader)
        if order is None:
            if not warned[0]:
                warned[0] = True
                log.warning("dda: the DataLoader's order cannot be known ahead; no prefetch hints")
            return None
        lookup = path_of or _default_path_of(loader.dataset)
        return [lookup(i) for i in order]

    return hints
