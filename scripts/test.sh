#!/usr/bin/env bash
# Set up and run the test suite (CPU). .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM's CPU build in its own venv (it pins an older transformers); tests/test_vllm.py runs it in
# child processes and, with REQUIRE set, fails instead of skipping when the venv is missing.
OPTIMUM_LCQAT_VLLM_PYTHON=$(bash scripts/setup_vllm.sh | tail -n 1)
export OPTIMUM_LCQAT_VLLM_PYTHON OPTIMUM_LCQAT_REQUIRE_VLLM=1
PY=${PYTHON:-python3}
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero.
# Tests import the installed package (tests/ has no __init__.py, repo root is not on sys.path).
# -rs: every skipped test is listed with its reason; --durations: the slowest tests, to keep the suite short.
exec "$PY" -P -m pytest -p no:cacheprovider -q -rs --durations=15 tests "$@"
