#!/usr/bin/env bash
# Set up mllm in ./.venv with nothing but Python 3 on the machine.
#
#   bash scripts/setup.sh          # the library and its CLI
#   bash scripts/setup.sh --dev    # + test and lint tools, and lmms-eval without its heavy deps
#
# PyTorch is installed first, so that the build matching the machine is the one pip keeps:
#   * a torch already in the venv is kept;
#   * a CPU wheel that pip can see locally (pip's find-links) is used when there is one;
#   * with an NVIDIA GPU (nvidia-smi works): PyPI's default CUDA build;
#   * otherwise: the CPU build from PyTorch's CPU index (no multi-GB CUDA download).
# Override with MLLM_TORCH_SPEC (e.g. "torch==2.9.1") and/or MLLM_TORCH_INDEX_URL.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
py=.venv/bin/python
pip=(.venv/bin/python -m pip --disable-pip-version-check)

torch_spec="${MLLM_TORCH_SPEC:-torch==2.13.0}"
if "$py" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
elif [[ -n "${MLLM_TORCH_INDEX_URL:-}" ]]; then
  "${pip[@]}" install -q "$torch_spec" --index-url "$MLLM_TORCH_INDEX_URL"
elif "${pip[@]}" install -q --no-index --no-deps "$torch_spec" >/dev/null 2>&1; then
  "${pip[@]}" install -q "$torch_spec"  # torch's own dependencies, from the package index
  echo "setup: installed $torch_spec from a local wheel"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" install -q "$torch_spec"
else
  "${pip[@]}" install -q "$torch_spec" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi

# deepspeed's setup.py imports torch: build it against the torch just installed, not an isolated copy.
"${pip[@]}" install -q setuptools wheel
"${pip[@]}" install -q --no-build-isolation "deepspeed>=0.16"
"${pip[@]}" install -q -e ".${extras}"
if [[ -n "$extras" ]]; then
  # lmms-eval for tests/test_lmms_eval_adapter.py (`python -m lmms_eval --model mllm`), without its own
  # requirements (torchvision, which would swap torch, and several GB more): only what its CLI imports
  # to run a local task, the torch installed above pinned. `pip install -e ".[lmms]"` gives the full set.
  # filelock<4: lmms-eval 0.7.3 patches filelock._api, which filelock 4 removed.
  "${pip[@]}" install -q --no-deps "lmms-eval==0.7.3"
  echo "torch==$("$py" -c 'import torch; print(torch.__version__)')" >.venv/torch-pin.txt
  "${pip[@]}" install -q -c .venv/torch-pin.txt loguru sacrebleu evaluate aiohttp pytablewriter tenacity \
    "filelock<4"
fi
echo "setup: done ($("$py" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
