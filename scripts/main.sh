#!/usr/bin/env bash
# Set up and run the main job on the embedded default: the quick six-experiment ablation study
# (tiny backbones and the synthetic Vietnamese shapes set are built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two cells at a time: each tiny cell uses a second core or GPU poorly (README: Speed).
vqadapt ablate --quick --jobs 2 "$@"
