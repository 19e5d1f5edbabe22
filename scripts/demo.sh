#!/usr/bin/env bash
# Install and run the demo: embedded broker, a coordinator and two edge agents, federated
# training on California Housing and then MNIST, and a verified ledger at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/fledger demo "$@"
