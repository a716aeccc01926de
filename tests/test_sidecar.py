"""`dda sidecar` as a real subprocess: health, readiness, the loader API, exit codes, SIGTERM
with a reader blocked on a cold read, counters checked against the HTTP server's own log, and
a real Prometheus scraping it while a torch DataLoader (wrapped by sidecar.loader) reads the
mount, with every PromQL expression of the Grafana dashboard evaluated."""
from __future__ import annotations

import json
import shutil
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounting import DDA, mounted, wait_until
from sidecar.sample import make_sample_repo
from sidecar_util import Prometheus, Sidecar, promtool_check

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
DASHBOARD = Path(__file__).resolve().parent.parent / "helm" / "dda-sidecar" / "dashboards" / "dda-sidecar.json"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample_repo(tmp_path_factory.mktemp("sidecar-sample"))


def http_env(http_remote) -> dict[str, str]:
    return {"DDA_REMOTE_HTTP_USER": http_remote.user, "DDA_REMOTE_HTTP_PASSWORD": http_remote.password}


def test_health_metrics_loader_api_and_sigterm(sample, mp, tmp_path):
    repo, _ = sample
    with Sidecar(str(repo), mp, tmp_path / "cache") as sc:
        assert mounted(mp)
        assert sc.get("/healthz") == (200, b"ok\n")
        assert sc.get("/readyz") == (200, b"ready\n")
        assert (mp / "README.md").read_bytes().startswith(b"# sample")
        names = sorted(os.listdir(mp / "data/images/dogs"))
        # hints: relative to the mount, or absolute under it; unknown paths come back as sent
        status, reply = sc.post("/v1/hints", {"paths": [f"data/images/dogs/{names[0]}",
                                                        str(mp / "data/images/dogs" / names[1]),
                                                        "data/images/dogs/nope.jpg", "/elsewhere/x.jpg"]})
        assert status == 200 and reply == {"accepted": 2, "unknown": ["data/images/dogs/nope.jpg", "/elsewhere/x.jpg"]}
        assert sc.post("/v1/hints", {"paths": "x"})[0] == 400
        status, reply = sc.post("/v1/batch-wait", {"seconds": [0.01, 0.2, 3.0, -1, "x", float("1e9")]})
        assert status == 200 and reply == {"observed": 3, "rejected": 3}
        assert sc.get("/nope")[0] == 404 and sc.get("/v1/hints")[0] == 405

        text = sc.metrics_text()
        check = promtool_check(text)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check
        assert sc.value("dda_mount_up") == 1
        assert sc.value("dda_batch_wait_seconds_count") == 3
        assert sc.value("dda_hinted_files_total", known="true") == 2
        assert sc.value("dda_hinted_files_total", known="false") == 2
        info = [lab for n, lab, _ in sc.samples() if n == "dda_snapshot_info"]
        assert len(info) == 1 and info[0]["revision"] == "main" and len(info[0]["commit"]) == 40
        assert info[0]["mount"] == str(mp) and info[0]["repo"].endswith(str(repo))
        # never a path in any label
        assert "dogs" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
        assert wait_until(lambda: sc.value("dda_prefetch_issued_files_total") == 2, 10)

        rc, took = sc.stop(signal.SIGTERM)
        assert rc == 0 and took < 5, sc.output()
        assert not mounted(mp)


def test_env_and_flags_configure_it(sample, mp, tmp_path):
    repo, _ = sample
    sc = Sidecar(str(repo), mp, tmp_path / "cache", env={"DDA_REVISION": "v1", "DDA_CACHE_SIZE": "3G"},
                 args=("--cache-size", "2G"))
    with sc:
        assert sc.value("dda_cache_budget_bytes") == 2 * 1024 ** 3        # a flag beats the environment
        info = [lab for n, lab, _ in sc.samples() if n == "dda_snapshot_info"]
        assert info[0]["revision"] == "v1"
        assert sc.stop(signal.SIGINT)[0] == 0
    missing = subprocess.run([DDA, "sidecar", "--repo", str(repo)], capture_output=True, text=True, timeout=30,
                             env={k: v for k, v in os.environ.items() if k != "DDA_MOUNT"})
    assert missing.returncode != 0 and "--mount" in missing.stderr and "Traceback" not in missing.stderr


def test_unmounted_from_outside_exits_nonzero(sample, mp, tmp_path):
    repo, _ = sample
    with Sidecar(str(repo), mp, tmp_path / "cache") as sc:
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        rc = sc.wait(15)
        assert rc is not None and rc != 0, sc.output()
        assert "ended unexpectedly" in sc.output()
        assert not mounted(mp)


def test_sigterm_with_reader_blocked_on_cold_read(sample, mp, tmp_path):
    """A remote that accepts connections and never answers; a reader blocked in read(); SIGTERM
    must still unmount and exit 0 within seconds, and the reader gets an error, not a hang."""
    from faultremote import FaultRemote

    repo, remote = sample
    cache = tmp_path / "cache"
    server = FaultRemote(Path(remote)).start()
    env = {"DDA_REMOTE_STORAGE_URL": server.url, "DDA_DEADLINE": "120"}
    # the .dir manifest comes from the cache, filled (and proven for this remote: tenancy) by a
    # first run while the remote answers; then it accepts connections and never answers
    subprocess.run([DDA, "ls", str(repo)], env={**os.environ, "DDA_CACHE_DIR": str(cache), **env}, check=True,
                   capture_output=True, timeout=60)
    server.fault("stall", method=None, times=None, seconds=3600)
    reader = None
    try:
        with Sidecar(str(repo), mp, cache, env=env) as sc:
            # labels.csv: its size is in its .dvc file, so the read itself is what blocks
            reader = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()",
                                       str(mp / "data" / "labels.csv")], stderr=subprocess.PIPE, text=True)
            time.sleep(1.5)
            assert reader.poll() is None, "the read should be blocked on the silent remote"
            assert sc.get("/healthz") == (200, b"ok\n")      # other requests are still served
            rc, took = sc.stop(signal.SIGTERM)
            assert rc == 0, sc.output()
            assert took < 6, f"took {took:.1f}s\n{sc.output()}"
            assert not mounted(mp)
            assert reader.wait(10) != 0
    finally:
        server.stop()
        if reader is not None and reader.poll() is None:
            reader.kill()


def test_counters_agree_with_the_server(dvc3_repo, http_remote, mp, tmp_path):
    """Bytes streamed, requests, hits and misses against what nginx logged and what we read."""
    expected = {rel: p.read_bytes() for rel, p in dvc3_repo.expected_files().items()}
    mark = http_remote.mark()
    with Sidecar(dvc3_repo.git_url, mp, tmp_path / "cache", revision=dvc3_repo.branches["http"],
                 env=http_env(http_remote)) as sc:
        # cold reads, one file per directory (no directory walk to prefetch behind)
        cold = ["data/images/top_2.bin", "data/images/cats/cat_07.bin", "data/images/dogs/dog_05.bin",
                "data/images/dogs/small/puppy_05.bin", "data/images/birds/deep/er/bird_04.bin", "data/labels.csv"]
        for rel in cold:
            assert (mp / rel).read_bytes() == expected[rel]
        hinted = [f"data/images/cats/cat_0{i}.bin" for i in range(4)]
        status, reply = sc.post("/v1/hints", {"paths": hinted[:2] + [str(mp / p) for p in hinted[2:]]})
        assert status == 200 and reply == {"accepted": 4, "unknown": []}
        assert wait_until(lambda: sc.value("dda_prefetch_issued_files_total") == 4, 20)
        for rel in hinted:
            assert (mp / rel).read_bytes() == expected[rel]

        requests = http_remote.requests_since(mark)
        assert requests and all(r.status in (200, 206) for r in requests), requests
        gets = [r for r in requests if r.method == "GET"]
        heads = [r for r in requests if r.method == "HEAD"]
        assert sc.value("dda_remote_bytes_total") == sum(r.bytes_sent for r in requests)
        assert sc.value("dda_remote_request_duration_seconds_count", op="read") == len(gets)
        assert sc.value("dda_remote_request_duration_seconds_count", op="size") == len(heads)
        assert sc.value("dda_remote_request_duration_seconds_count", status="ok") == len(requests)
        assert sc.value("dda_cache_reads_total", kind="data", result="miss") == len(cold)
        assert sc.value("dda_cache_reads_total", kind="data", result="hit") == len(hinted)
        assert sc.value("dda_cache_reads_total", kind="metadata", result="miss") == \
            len(heads) + len([r for r in gets if r.uri.endswith(".dir")])
        assert sc.value("dda_read_wait_seconds_count") == len(cold)
        assert sc.value("dda_served_bytes_total") == sum(len(expected[p]) for p in cold + hinted)
        assert sc.value("dda_prefetch_used_files_total") == 4
        assert sc.value("dda_prefetch_issued_bytes_total") == sum(len(expected[p]) for p in hinted)
        assert sc.value("dda_errors_total") == 0 and sc.value("dda_remote_retries_total") == 0
        assert sc.value("dda_cache_used_bytes") == sc.value("dda_remote_bytes_total")
        assert sc.stop()[0] == 0


# -- a real Prometheus, a real DataLoader, the dashboard -------------------------------------------
class FilesDataset:
    """Map-style dataset over files of the mount (torch's Dataset protocol, no torch import)."""

    def __init__(self, root: Path, files: list[str]):
        self.root = root
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import torch

        data = (self.root / self.files[index]).read_bytes()
        return torch.tensor([index, len(data), sum(data[:64])])


def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(doc["panels"])
    return found


def test_prometheus_scrapes_while_a_dataloader_reads_and_the_dashboard_has_data(dvc3_repo, http_remote, mp,
                                                                                 tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from sidecar.loader import epoch_paths, instrument

    expected = {rel: p.read_bytes() for rel, p in dvc3_repo.expected_files().items()}
    files = sorted(p for p in expected if p.startswith("data/images/") and expected[p])
    mark = http_remote.mark()
    with Sidecar(dvc3_repo.git_url, mp, tmp_path / "cache", revision=dvc3_repo.branches["http"],
                 env=http_env(http_remote)) as sc, \
            Prometheus(tmp_path / "prom", [f"127.0.0.1:{sc.port}"], {"namespace": "ml", "pod": "trainer-0"}) as prom:
        assert wait_until(lambda: prom.query('up{job="dda-sidecar"} == 1'), 20), "prometheus never scraped"
        dataset = FilesDataset(mp, files)
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
        wrapped = instrument(loader, url=sc.url, mount=str(mp),
                             hints=epoch_paths(loader, path_of=lambda i: str(mp / dataset.files[i])))
        batches = 0
        for _ in range(2):
            seen = []
            for batch in wrapped:
                batches += 1
                for index, length, head in batch.tolist():
                    assert length == len(expected[files[index]]) and head == sum(expected[files[index]][:64])
                    seen.append(index)
            assert sorted(seen) == list(range(len(files)))
        assert wrapped.reporter.flush(5)
        assert wrapped.reporter.last_hint_reply == {"accepted": len(files), "unknown": []}
        assert sc.value("dda_batch_wait_seconds_count") == batches

        check = promtool_check(sc.metrics_text())
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
        # counters agree with the server and with what the workload did
        assert sc.value("dda_remote_bytes_total") == http_remote.bytes_since(mark)
        reads = sc.value("dda_cache_reads_total", kind="data")
        assert reads == len(files)   # one FUSE read per (small) file; the second epoch hits the page cache
        assert sc.value("dda_served_bytes_total") == sum(len(expected[p]) for p in files)

        # Prometheus has the workload's last batch wait
        assert wait_until(lambda: [r for r in prom.query("dda_batch_wait_seconds_count")
                                   if float(r["value"][1]) == batches], 15)
        time.sleep(1.5)   # one more scrape, so rates over the window see the end of the run
        repo_label = prom.query("dda_snapshot_info")[0]["metric"]["repo"]
        assert prom.api("label/namespace/values", **{"match[]": "dda_snapshot_info"}) == ["ml"]
        assert prom.api("label/pod/values", **{"match[]": 'dda_snapshot_info{namespace=~"ml"}'}) == ["trainer-0"]
        assert prom.api("label/repo/values", **{"match[]": 'dda_snapshot_info{namespace=~"ml", pod=~".*"}'}) == \
            [repo_label]
        # as Grafana formats a variable for a regex matcher: regex-escaped, then as a PromQL string
        repo_regex = re.escape(repo_label).replace("\\", "\\\\")
        dead = []
        queries = dashboard_queries()
        assert len(queries) >= 20
        for title, expr in queries:
            promql = (expr.replace("$__rate_interval", "1m").replace("$namespace", "ml").replace("$pod", ".*")
                      .replace("$repo", repo_regex))
            assert "$" not in promql, promql
            if not prom.query(promql):
                dead.append((title, promql))
        assert not dead, dead
        streamed = prom.query(f'sum(dda_remote_bytes_total{{namespace="ml", repo="{repo_label}"}})')
        assert float(streamed[0]["value"][1]) == http_remote.bytes_since(mark)
        p95 = prom.query('histogram_quantile(0.95, sum by (le) (rate(dda_batch_wait_seconds_bucket[1m])))')
        assert float(p95[0]["value"][1]) > 0
        assert sc.stop()[0] == 0


def test_sigterm_under_read_load_exits_zero_every_time(tmp_path):
    """Issue 16: SIGTERM while `find ... -exec cat` loops over the mount used to end in a
    segfault in libfuse3 (3 of 21) or an InvalidStateError traceback (7 of 21). Each run is a
    child forked from one warm process serving exactly as `dda sidecar` does (serve(), its
    signal handlers, interpreter shutdown), SIGTERM at a random moment 0-300 ms after the
    mount is live; every run must exit 0, print no error and leave nothing mounted. The issue
    asks for 200 runs: 0.45 s each on the idle 2-CPU machine, 1.3 s when it is busy (mostly
    opening the snapshot), so this runs DDA_SIGTERM_RUNS (default 40, 20-55 s); set it to 200
    for the full count (200/200 passed in 262 s on a busy machine). The same harness on the
    code before the fix: 3 failures in 25 runs (a SIGSEGV, two InvalidStateError tracebacks)."""
    runs = int(os.environ.get("DDA_SIGTERM_RUNS", "40"))
    repo, _ = make_sample_repo(tmp_path / "s", images=40)
    mp = tmp_path / "mnt"
    mp.mkdir()
    harness = Path(__file__).resolve().parent / "sigterm_harness.py"
    proc = subprocess.run([sys.executable, str(harness), str(repo), str(mp), str(tmp_path / "cache"), str(runs)],
                          capture_output=True, text=True, timeout=60 + 10 * runs)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"runs {runs} failures 0" in proc.stdout
    assert not mounted(mp)


@pytest.mark.skipif(subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                   capture_output=True).returncode != 0, reason="needs unshare (root)")
def test_fallback_sidecar_exits_when_the_app_has_exited(sample, tmp_path):
    """Fallback mode (no native sidecars): the pod shares one process namespace, every container
    has its own mount namespace. Played with unshare: a PID namespace for the pod (its PID 1
    stands for the pause process), the sidecar, and an app in a mount namespace of its own
    that reads through the mount. The sidecar must keep serving while the app runs, then exit
    0 by itself once the app has exited (so a Job's pod completes)."""
    repo, _ = sample
    mp, out, log = tmp_path / "mnt", tmp_path / "app-read", tmp_path / "sidecar.log"
    mp.mkdir()
    script = f"""
DDA_REPO='{repo}' DDA_MOUNT='{mp}' DDA_CACHE_DIR='{tmp_path / "cache"}' DDA_PORT=0 DDA_BIND=127.0.0.1 \\
  DDA_EXIT_WITH_APP=true '{DDA}' sidecar > '{log}' 2>&1 &
S=$!
i=0
until grep -q ' {mp} ' /proc/self/mountinfo; do
  i=$((i+1)); [ $i -gt 1200 ] && {{ echo never-mounted; kill $S; exit 90; }}; sleep 0.05
done
unshare -m sh -c "head -c 8 '{mp}/README.md' > '{out}'; sleep 2"
kill -0 $S && echo alive-after-app
wait $S
echo sidecar-rc=$?
"""
    started = time.monotonic()
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert "sidecar-rc=0" in proc.stdout, proc.stdout + proc.stderr + log.read_text()
    assert "alive-after-app" in proc.stdout            # it did not stop before the app was done
    assert out.read_bytes() == b"# sample"
    assert "the app containers have exited; stopping" in log.read_text()
    assert time.monotonic() - started < 60


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_unprivileged_sidecar_sees_the_app_processes_of_other_users():
    """csi mode: the sidecar runs as 65534 with no capabilities and may not read another
    user's /proc/<pid>/ns/mnt; such a process (an app container's) still counts as an app."""
    app = subprocess.Popen(["unshare", "--mount", "sleep", "60"])
    try:
        assert wait_until(lambda: os.readlink(f"/proc/{app.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"), 5)
        code = ("import json, os; from sidecar.appwatch import app_processes; "
                "print(json.dumps([os.getpid(), app_processes()]))")
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                               "--bounding-set=-all", "--no-new-privs", sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=60, cwd="/",
                              env={"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        assert proc.returncode == 0, proc.stderr
        me, apps = json.loads(proc.stdout)
        assert app.pid in apps and me not in apps
    finally:
        app.kill()
        app.wait(10)
