#!/usr/bin/env bash
# Set up, then run the main job on the bundled SmolLM2-135M (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
