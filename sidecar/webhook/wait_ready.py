"""`python -m sidecar.webhook.wait_ready --port 9400 --timeout 300`: wait until the sidecar on
this pod answers /readyz with 200. The postStart hook of the fallback injection (clusters
without native sidecars): the kubelet starts the app containers only after it returns."""
from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def wait_ready(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    end = time.monotonic() + timeout
    url = f"http://{host}:{port}/readyz"
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.webhook.wait_ready")
    parser.add_argument("--port", type=int, default=9400)
    parser.add_argument("--timeout", type=float, default=300)
    ns = parser.parse_args(argv)
    if wait_ready(ns.port, ns.timeout):
        return 0
    print(f"dda-sidecar: not ready on port {ns.port} after {ns.timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
