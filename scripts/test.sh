#!/usr/bin/env bash
# Set up and run the test suite (CPU). .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero.
# Tests import the installed package (tests/ has no __init__.py, repo root is not on sys.path).
# -rs: every skipped test is listed with its reason.
exec "$PY" -P -m pytest -p no:cacheprovider -q -rs tests "$@"
