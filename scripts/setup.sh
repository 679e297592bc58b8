#!/usr/bin/env bash
# Create .venv and install vqadapt with its pinned dependencies (CPU torch 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
extra=()
# A CPU build of torch lies in /opt/wheels on this project's machines; elsewhere pip takes PyPI's.
[ -d /opt/wheels ] && extra+=(--find-links /opt/wheels)
# dev: tests and lint; demo: gradio for `vqadapt demo`; wandb, mlflow: the optional trackers
# (their tests run offline, and skip where they are not installed)
python -m pip install -q --disable-pip-version-check "${extra[@]}" -e ".[dev,demo,wandb,mlflow]"
python -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
