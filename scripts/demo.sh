#!/usr/bin/env bash
# Set up, then run the main job on the bundled default: SmolLM2-135M to 2 bits with LC-QAT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec optimum-lcqat demo "$@"
