#!/bin/sh
# Install what the benchmark harness needs besides the project itself:
# gcc (builds bench/loadgen.c), the peers Dante and microsocks from Debian,
# and pproxy from PyPI into the project venv. Machines are not kept between
# sessions, so this is the one place that says how to get them back.
# Usage (as root, from the repo root): sh bench/install_peers.sh
set -eu
VENV=${VENV:-.venv}
missing=""
command -v gcc >/dev/null || missing="$missing gcc"
command -v danted >/dev/null || missing="$missing dante-server"
command -v microsocks >/dev/null || missing="$missing microsocks"
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "please install (as root):$missing" >&2
        exit 1
    fi
    apt-get update -qq
    # The package starts no daemon here (no init); we start danted ourselves.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
# Pinned: bench/socksbench/pproxy_launcher.py works around this version's
# uvloop start-up, and figures are only comparable on the same version.
"$VENV/bin/python" -c "import pproxy" 2>/dev/null || "$VENV/bin/pip" install --quiet "pproxy==2.7.9"
echo "benchmark peers ready"
