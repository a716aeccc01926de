"""Test helpers for `dda sidecar`: the sidecar as a real subprocess, and a real Prometheus."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from mounting import DDA, mounted, wait_until
from servers import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, doc: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = None if doc is None else json.dumps(doc).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with _NO_PROXY.open(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Sidecar:
    """`dda sidecar` in a subprocess, configured through DDA_* variables as the webhook does."""

    def __init__(self, repo: str, mountpoint: Path, cache: Path, *, revision: str | None = None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.mountpoint = Path(mountpoint)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(cache).parent / f"sidecar-{self.port}.log"
        self.env = {**os.environ, "DDA_REPO": repo, "DDA_MOUNT": str(mountpoint), "DDA_CACHE_DIR": str(cache),
                    "DDA_PORT": str(self.port), "DDA_BIND": "127.0.0.1", **(env or {})}
        if revision:
            self.env["DDA_REVISION"] = revision
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Sidecar":
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen([DDA, "sidecar", *self.args], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        ok = wait_until(lambda: self.proc.poll() is not None or self._ready(), timeout, 0.1)
        if not ok or self.proc.poll() is not None:
            raise AssertionError(f"sidecar not ready (rc {self.proc.poll()}):\n{self.output()}")
        return self

    def _ready(self) -> bool:
        try:
            return self.get("/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        return http("GET", self.url + path, timeout=timeout)

    def post(self, path: str, doc: Any) -> tuple[int, Any]:
        status, body = http("POST", self.url + path, doc)
        return status, json.loads(body)

    def metrics_text(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        from prometheus_client.parser import text_string_to_metric_families

        return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(self.metrics_text())
                for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.samples()
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> tuple[int | None, float]:
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - started

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> "Sidecar":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)])
        if getattr(self, "_log", None):
            self._log.close()


def promtool_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


class Prometheus:
    """A real Prometheus scraping `targets` every second, with static labels as Kubernetes
    service discovery would add them (namespace, pod)."""

    def __init__(self, workdir: Path, targets: list[str], labels: dict[str, str]):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [{"job_name": "dda-sidecar", "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets, "labels": labels}]}],
        }
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config))   # JSON is YAML
        self.log = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Prometheus":
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={self.workdir / 'data'}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            try:
                return http("GET", self.url + "/-/ready", timeout=1)[0] == 200
            except OSError:
                return False

        if not wait_until(lambda: self.proc.poll() is not None or ready(), timeout, 0.1) or self.proc.poll() is not None:
            raise AssertionError(f"prometheus did not start:\n{self.log.read_text(errors='replace')[-4000:]}")
        return self

    def api(self, path: str, **params: str) -> Any:
        status, body = http("GET", f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body)
        assert status == 200 and doc.get("status") == "success", (path, params, doc)
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
