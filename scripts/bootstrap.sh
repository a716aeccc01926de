#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine (run as root):
#   scripts/bootstrap.sh demo   install, then run `dda demo`
#   scripts/bootstrap.sh test   install everything the tests need, then run the whole suite
#   scripts/bootstrap.sh install  only install
# Idempotent: reruns skip what is already there.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
mode=${1:-demo}
shift || true
venv=${DDA_VENV:-$here/.venv}

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

python_bin() {
  # Prefer a python >= 3.11 already on PATH; otherwise Debian's.
  for c in python3.13 python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$c"; return
    fi
  done
  apt_install python3 python3-venv python3-pip
  echo python3
}

base_packages=(git ca-certificates fuse3 libfuse3-dev pkg-config gcc)
# podman + runc + catatonit (a pod's infra container) + debootstrap: tests/test_pod_play.py builds
# the image from our install steps and plays the webhook-mutated pod with `podman kube play`.
test_packages=(nginx fcgiwrap libnginx-mod-http-dav-ext prometheus git-lfs podman runc catatonit debootstrap)

case "$mode" in
  demo|install) apt_install "${base_packages[@]}" ;;
  test) apt_install "${base_packages[@]}" "${test_packages[@]}" ;;
  *) echo "usage: $0 demo|test|install" >&2; exit 2 ;;
esac

# pip, minus one harmless warning some mirrors print for every package.
pip_install() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

py=$(python_bin)
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" 2>/dev/null || { apt_install python3-venv; "$py" -m venv "$venv"; }
fi
pip_install "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
if [ "$mode" = test ]; then
  pip_install "$venv/bin/python" -m pip install -q -e ".[test]"
  # DVC 2 authors the DVC-2 fixture repositories (its own venv: it pins older libraries).
  dvc2=${DDA_DVC2_VENV:-$here/.venv-dvc2}
  if [ ! -x "$dvc2/bin/dvc" ]; then
    "$py" -m venv "$dvc2"
    pip_install "$dvc2/bin/python" -m pip install -q "dvc==2.58.2" "pathspec<0.12" "dulwich<0.22"
  fi
  export DDA_DVC2_BIN="$dvc2/bin/dvc"
  # install_hooks() must work on Python 3.12 and 3.13 too: where such interpreters exist
  # (python3.12 on PATH, or pyenv's), give each a venv with the package's dependencies.
  extra=""
  for v in 3.12 3.13; do
    interp=""
    # A pyenv shim on PATH may exist yet refuse to run: take the first candidate that runs.
    for c in $(command -v "python$v" 2>/dev/null) $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/$v*/bin/python$v 2>/dev/null); do
      if "$c" -c 'import venv' >/dev/null 2>&1; then interp=$c; break; fi
    done
    [ -n "$interp" ] || continue
    pv="$here/.venv-py$v"
    if [ ! -x "$pv/bin/python" ]; then
      "$interp" -m venv "$pv"
      pip_install "$pv/bin/python" -m pip install -q httpx h2 botocore PyYAML tqdm prometheus-client pydantic-settings ruamel.yaml pathspec tenacity pytest numpy pandas pillow
    fi
    extra="$extra${extra:+:}$pv/bin/python"
  done
  export DDA_EXTRA_PYTHONS="$extra"
  # The container image's install steps (scripts/image-install.sh) run for real in the tests.
  export DDA_IMAGE_BUILD_CHECK="${DDA_IMAGE_BUILD_CHECK:-1}"
else
  pip_install "$venv/bin/python" -m pip install -q -e .
fi

# Editable installs do not place the hooks' .pth file in site-packages; do it here.
"$venv/bin/python" -c "import sidecar.hooks as h; h.install_autoload()"

case "$mode" in
  demo) exec "$venv/bin/dda" demo "$@" ;;
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  install) echo "installed into $venv" ;;
esac
