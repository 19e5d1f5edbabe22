#!/usr/bin/env bash
# The project's test command (README, .ci/run): install, lint, type-check, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
ruff check .
mypy federation ledger coordinator edge_agent fledger
python -m pytest -q "$@"
