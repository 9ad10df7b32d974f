#!/usr/bin/env bash
# Set up, then run the test suite (pass pytest arguments through, e.g. -k capture).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
