#!/usr/bin/env bash
# One prepared run for a GPU machine: fixture parity (TF32 off), model.fit images/s and MFU of
# R50+ViT-B/16 at 224 (bf16 and float32, batch 64 and 256, jit_compile) on JAX (and PyTorch, eager,
# batch 64, while time is left), inference images/s at batch 1 and 256 against timm's
# vit_base_r50_s16_224 (eager and torch.compile, bf16 autocast), peak GPU memory. About 8 minutes.
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --dry-run  # tiny model, 2 steps, on the CPU (tests/test_backends.py runs it)
#
# The GPU machine has Python with jax/jaxlib (CUDA), torch (CUDA), timm and flax, but no TensorFlow
# and no network. What Keras needs beyond those comes from .whl/ (git-ignored), filled here with:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0 h5py==3.14.0 absl-py==2.5.1 rich==15.0.0 \
#     markdown-it-py==4.0.0 mdurl==0.1.2 pygments==2.19.2 packaging==26.4
#
# (9.4 MB; all pure Python but optree and h5py, whose cp312 manylinux wheels are taken). Only the
# packages that do not import are installed, with --no-deps --no-index: nothing the machine has is
# replaced, except a keras other than 3.15.1. vit_keras itself runs from the checkout (PYTHONPATH).
# Copy the checkout with .whl/ to the GPU machine and run "OUT=<folder> bash benchmarks/gpu.sh" (about 8 min).
# Environment: PYTHON (default python3), OUT (folder for the JSON lines; default a temporary one),
# BUDGET_S (seconds for the timed part, default 450).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=(--dry-run)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
start=$(date +%s)

missing=()
for pair in namex:namex optree:optree h5py:h5py absl:absl-py rich:rich markdown_it:markdown-it-py \
            mdurl:mdurl pygments:pygments packaging:packaging; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [[ "$("$PY" -c 'import keras; print(keras.__version__)' 2>/dev/null)" != "3.15.1" ]]; then
  missing+=("keras==3.15.1")
fi
if ((${#missing[@]})); then
  echo "installing from .whl/: ${missing[*]}"
  "$PY" -m pip install -q --no-deps --no-index --find-links .whl "${missing[@]}"
fi

deadline=$((start + ${BUDGET_S:-450}))
if ((${#DRY[@]})); then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
fi
status=0
# JAX takes 75 % of the GPU's memory up front by default; batch 256 in float32 may need more.
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92} KERAS_BACKEND=jax "$PY" benchmarks/gpu.py --sections parity,train,infer --deadline "$deadline" \
  --out "$OUT/jax.jsonl" "${DRY[@]}" || status=1
# Fine-tuning memory (issue 23): XLA's device memory for one train step of ViT-B/16 and R50+ViT-B/16,
# plain vs remat vs LoRA rank 8 vs head only (the "XLA temp" column), while time is left.
if ((${#DRY[@]} == 0)) && (($(date +%s) + 120 < deadline)); then
  KERAS_BACKEND=jax timeout $((deadline - $(date +%s))) "$PY" benchmarks/finetune_memory.py --backends jax \
    --limit-gb 100 --out "$OUT/finetune_memory.jsonl" || status=1
fi
# PyTorch's process must not find the GPU memory taken: JAX's ended above.
KERAS_BACKEND=torch "$PY" benchmarks/gpu.py --sections parity,timm,infer,train --deadline "$deadline" \
  --out "$OUT/torch.jsonl" "${DRY[@]}" || status=1
echo
echo "## $(date -u +%Y-%m-%dT%H:%MZ), $(($(date +%s) - start)) s, rows in $OUT"
"$PY" benchmarks/gpu.py --report "$OUT/jax.jsonl" "$OUT/torch.jsonl" || status=1
exit $status
