#!/usr/bin/env bash
# The container image's install steps, in one place: the Dockerfile runs them, CI checks them.
#
#   image-install.sh build-deps          apt: compiler and libfuse3 headers (builder stage)
#   image-install.sh wheels SRC OUT      wheels of the project and every dependency (pyfuse3 compiled)
#   image-install.sh runtime-deps        apt: fuse3, git, ca-certificates (runtime stage)
#   image-install.sh install WHEELS      pip install from those wheels only (no index)
#   image-install.sh user                the non-root user dda (uid/gid 10001) the webhook runs as
#   image-install.sh check [--build]     verify every pinned version exists (apt-cache, pip download);
#                                        --build also builds the wheels and installs them into a
#                                        throwaway venv, then runs `dda webhook --help` and imports pyfuse3
#
# Pins are for Debian 12 (bookworm), the base of python:3.11-slim-bookworm. Bump them together.
set -euo pipefail

APT_BUILD=(gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 libfuse3-dev=3.14.0-4 pkg-config=1.8.1-1)
APT_RUNTIME=(fuse3=3.14.0-4 git=1:2.39.5-0+deb12u3 ca-certificates=20250419~deb12u2)
DDA_UID=10001

# Every runtime Python dependency, pinned (a constraints file: dependencies added to
# pyproject.toml later still resolve, unpinned, until they are added here).
constraints() {
  cat <<'EOF'
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-types==0.8.0
anyio==4.16.0
attrs==26.1.0
botocore==1.43.117
certifi==2026.10.19.post1
frozenlist==1.8.0
grpcio==1.85.3
h11==0.16.0
h2==4.4.1
hpack==4.2.0
httpcore==1.0.9
httpx==0.28.1
hyperframe==6.1.0
idna==3.20
ijson==3.6.0
jmespath==1.1.0
multidict==7.2.1
outcome==1.3.0.post0
pathspec==1.1.1
prometheus_client==0.26.0
propcache==0.5.4
protobuf==7.36.2
pydantic==2.14.4
pydantic-settings==2.16.3
pydantic_core==2.50.5
pyfuse3==3.5.0
python-dateutil==2.9.0.post0
python-dotenv==1.2.4
PyYAML==6.0.4
ruamel.yaml==0.19.1
six==1.17.0
sniffio==1.3.1
sortedcontainers==2.4.0
tenacity==9.2.1
tqdm==4.70.1
trio==0.35.0
typing_extensions==4.16.0
typing-inspection==0.4.5
urllib3==2.8.0
yarl==1.25.1
EOF
}

py=${PYTHON:-python3}
say() { echo "image-install: $*" >&2; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  apt-get clean
  rm -rf /var/lib/apt/lists/*
}

constraints_file() {
  local f
  f=$(mktemp)
  constraints >"$f"
  echo "$f"
}

build_wheels() {
  local src=$1 out=$2 c py=${PYTHON:-$py}   # PYTHON given for this call wins
  c=$(constraints_file)
  mkdir -p "$out"
  "$py" -m pip wheel --quiet --no-cache-dir -c "$c" --wheel-dir "$out" "$src"
  rm -f "$c"
  say "wheels in $out: $(ls "$out" | wc -l)"
}

install_wheels() {
  local wheels=$1 c py=${PYTHON:-$py}
  c=$(constraints_file)
  "$py" -m pip install --quiet --no-cache-dir --no-index --find-links "$wheels" -c "$c" dda-sidecar
  rm -f "$c"
  dda --help >/dev/null
}

add_user() {
  getent group dda >/dev/null || groupadd --gid "$DDA_UID" dda
  id dda >/dev/null 2>&1 || useradd --uid "$DDA_UID" --gid "$DDA_UID" --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin dda
}

check() {
  local build=${1:-} failed=0 tmp pkg name version
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  for pkg in "${APT_BUILD[@]}" "${APT_RUNTIME[@]}"; do
    name=${pkg%%=*} version=${pkg#*=}
    if apt-cache madison "$name" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF "$version"; then
      say "apt ok: $name=$version"
    else
      say "apt MISSING: $name=$version (available: $(apt-cache madison "$name" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); printf "%s ", $2}'))"
      failed=1
    fi
  done
  constraints >"$tmp/pins.txt"
  if "$py" -m pip download --quiet --no-deps --no-cache-dir -d "$tmp/dl" -r "$tmp/pins.txt" >/dev/null 2>&1; then
    say "pip ok: all $(wc -l <"$tmp/pins.txt") pins ($(tr '\n' ' ' <"$tmp/pins.txt"))"
  else
    while read -r pin; do   # which one?
      "$py" -m pip download --quiet --no-deps --no-cache-dir -d "$tmp/dl" "$pin" >/dev/null 2>&1 \
        || { say "pip MISSING: $pin"; failed=1; }
    done <"$tmp/pins.txt"
  fi
  if [ "$build" = --build ] && [ $failed = 0 ]; then
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    "$py" -m venv "$tmp/venv"
    "$tmp/venv/bin/python" -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored" >&2) >/dev/null
    # a clean copy of the sources, as the Dockerfile's COPY gives them (no build/ or egg-info)
    mkdir -p "$tmp/src"
    cp -r "$here/pyproject.toml" "$here/setup.py" "$here/README.md" "$here/sidecar" "$tmp/src/"
    find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
    PYTHON="$tmp/venv/bin/python" build_wheels "$tmp/src" "$tmp/wheels" 2> >(grep -v "is ignored" >&2)
    PATH="$tmp/venv/bin:$PATH" PYTHON="$tmp/venv/bin/python" install_wheels "$tmp/wheels" 2> >(grep -v "is ignored" >&2)
    "$tmp/venv/bin/dda" webhook --help >/dev/null
    "$tmp/venv/bin/python" -c "import pyfuse3, sidecar.webhook.app, sidecar.fuse.mount; print('image-install: imports ok, pyfuse3', pyfuse3.__version__ if hasattr(pyfuse3, '__version__') else '')" >&2
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable >"$tmp/freeze.txt" 2>/dev/null
    local unpinned
    unpinned=$(grep -v -i -F -x -f <(constraints) "$tmp/freeze.txt" | grep -v -i "^dda-sidecar==" || true)
    if [ -n "$unpinned" ]; then
      say "installed but not pinned here (add to constraints): $(echo "$unpinned" | tr '\n' ' ')"
      failed=1
    fi
    say "build ok: $(ls "$tmp/wheels" | wc -l) wheels installed into a throwaway venv"
  fi
  return $failed
}

case "${1:-}" in
  build-deps) apt_install "${APT_BUILD[@]}" ;;
  runtime-deps) apt_install "${APT_RUNTIME[@]}" ;;
  wheels) build_wheels "${2:?SRC}" "${3:?OUT}" ;;
  install) install_wheels "${2:?WHEELS}" ;;
  user) add_user ;;
  check) check "${2:-}" ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
