#!/usr/bin/env bash
# The prepared device check of the GPU issue: one command on a machine with a CUDA GPU and no
# network, from the repository root, after `bash bench/prepare_device.sh` filled .device/:
#
#     bash bench/gpu_check.sh            # about 7-8 minutes on one H200
#
# 1. the cuda-marked tests (every strategy cached and uncached in bf16; train / eval / predict /
#    export on the GPU; GPU <-> CPU runs; resume; the step under torch.cuda's sync debug mode)
#    and the meta-device step tests;
# 2. a tiny end-to-end run of the CLI on CUDA: train, eval, predict, export, ablate (smoke);
# 3. the real-shape speed table (bench/gpu_check.py): the plain loop, vqadapt uncached and
#    cached, batch 32 and 128, samples/s, MFU, peak memory; and each speed path on and off;
#    activation memory with and without gradient checkpointing beside the plan's estimate
#    (bench/checkpointing_memory.py);
# 4. `vqadapt train` end to end at real shapes on 3,000 synthetic questions, cached and not
#    (bench/real_shapes.py), against the in-memory step.
# Logs and JSON go to $OUT (the device tool's output folder) or bench/results/gpu_check.
# SMOKE=1 runs the same sections on the CPU at tiny shapes (a check of the script itself:
# `SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh`); the cuda tests then skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/vqadapt-gpu-check}
mkdir -p "$WORK"
SITE="$WORK/site"
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
SCALE=1
DEVICE=cuda
SPEED=(--batch_sizes 32 128 --steps 6)
REAL=(--batch_size 128)
CKPT=(--batch_size 64)
if [ "$SMOKE" = 1 ]; then
  SCALE=4  # two slow CPU cores, not a GPU
  DEVICE=cpu
  SPEED=(--tiny --device cpu --batch_sizes 4 --steps 1)
  REAL=(--tiny --batch_size 8)
  CKPT=(--tiny --device cpu --batch_size 4)
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .device/*.whl
export PYTHONPATH="$SITE:$PWD/src:$PWD/bench" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VQADAPT_CACHE="$WORK/cache" TOKENIZERS_PARALLELISM=false
status=0
section() {  # section NAME SECONDS COMMAND...: run with a time limit, log, keep going
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  echo "== $name (limit ${limit} s, $(date +%T))"
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  tail -n 40 "$OUT/$name.log"
  echo "== $name: exit $code in $((SECONDS - started)) s"
  [ "$code" = 0 ] || status=1
}
vq() { "$PY" -m vqadapt "$@"; }

"$PY" - <<'PYEOF' | tee "$OUT/environment.log"
import torch, transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers",
      transformers.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
PYEOF

# Sections in order of what they decide; each has a time limit (x4 under SMOKE) summing to
# 8 minutes with the setup, so a slow section is cut (and says so) rather than the whole check.
section tests 100 "$PY" -m pytest -q -p no:cacheprovider -m "cuda" tests/test_cuda.py \
  tests/test_device.py

prepare() {  # the data and tiny backbones the later sections share
  set -e
  vq backbones tiny --out "$WORK/tiny" --text_steps 20 --vision_steps 20
  vq data synth --out "$WORK/data" --n 4000 --seed 0
}
tiny() {
  set -e
  local data=(--train_file "$WORK/data/train.csv" --test_file "$WORK/data/test.csv"
    --image_root "$WORK/data/images" --vision_model "$WORK/tiny/vision"
    --text_model "$WORK/tiny/text")
  vq train "${data[@]}" --use_vision_lora --use_text_lora --text_lora_r 16 --epochs 1 \
    --max_train_samples 800 --max_eval_samples 200 --output_dir "$WORK/run" --overwrite \
    --no_progress --device "$DEVICE"
  vq eval --run "$WORK/run" --split test --device "$DEVICE"
  vq eval --run "$WORK/run" --split test --device cpu
  local image
  image=$(ls "$WORK/data/images" | head -n 1)
  vq predict --run "$WORK/run" --image "$WORK/data/images/$image" --question "có mấy hình?" \
    --device "$DEVICE"
  vq export --run "$WORK/run" --out "$WORK/export" --overwrite --device "$DEVICE"
  vq ablate --quick --out "$WORK/ablation" --set train_file="$WORK/data/train.csv" \
    test_file="$WORK/data/test.csv" image_root="$WORK/data/images" \
    vision_model="$WORK/tiny/vision" text_model="$WORK/tiny/text" max_train_samples=400 \
    max_eval_samples=100 epochs=1
}
export PY WORK DEVICE
export -f prepare tiny vq
section prepare 30 bash -c prepare

section speed 120 "$PY" bench/gpu_check.py "${SPEED[@]}" --no_paths --out "$OUT/gpu_check.json"

section real_shapes 70 "$PY" bench/real_shapes.py --data "$WORK/data" \
  --tiny_text "$WORK/tiny/text" --work "$WORK/real" --in_memory "$OUT/gpu_check.json" \
  --out "$OUT/real_shapes.json" "${REAL[@]}"

section end_to_end 60 bash -c tiny

section checkpointing 35 "$PY" bench/checkpointing_memory.py "${CKPT[@]}" \
  --out "$OUT/checkpointing.json"

section paths 45 "$PY" bench/gpu_check.py "${SPEED[@]}" --paths_only --out "$OUT/paths.json"

echo "gpu check: $([ $status = 0 ] && echo passed || echo FAILED) (logs in $OUT)"
exit $status
