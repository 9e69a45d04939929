#!/usr/bin/env bash
# The step benchmark on one GPU, as ONE prepared command (about 7 minutes on an H100/H200): B/16 at
# I50/T16 and L/16 at I37/T8 (per-GPU batch 1024, checkpointing for L/16) against their full-length
# rows, eager vs torch.compile, this project vs OpenCLIP 3.3, and AdamW's step alone (fused vs
# compiled). Then (PART=memory, or all) the memory rows: the largest per-GPU batch of H/14 at I36/T8
# and bigG/14 at 70 px / T8 with checkpointing, its samples/s and MFU, the planner's estimate beside
# the measured peak (launch/bench_memory.py; not yet timed on a GPU). Prints the tables, writes JSON to $OUT.
#
#   PART=step|memory|all (default all)
#
#   bash launch/bench_gpu.sh                 # on the GPU machine, with the machine's own torch (>= 2.9)
#   DEVICE=cpu bash launch/bench_gpu.sh      # the same script's CPU path (small: 4 blocks, batch 16)
#
# The GPU machine needs the pure-Python packages the step imports; bring them as wheels in .whl/
# (pip download --no-deps -d .whl open_clip_torch==3.3.0 timm ftfy regex simplejpeg safetensors
# webdataset huggingface_hub tqdm wcwidth ...); they are installed into /tmp/site when present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$ROOT/bench_gpu_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = "cpu" ]; then
  "$PYTHON" launch/bench_step.py --device cpu --model ViT-B-16-CL16 --layers 4 --settings 224/77,112/16 \
    --batch 16 --steps 2 --rounds 5 --optimizers foreach,fused,compiled --json "$OUT/b16_cpu.json"
  exit
fi
PART="${PART:-all}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ "$PART" != "memory" ]; then
  "$PYTHON" launch/bench_step.py --device cuda --model ViT-B-16-CL16 --settings 224/77,112/16 \
    --batch 1024 --steps 5 --rounds 3 --sequential --optimizers fused,compiled --json "$OUT/b16.json"
  "$PYTHON" launch/bench_step.py --device cuda --model ViT-L-16-CL8-Syntax-GAP --settings 224/32,96/8 \
    --batch 1024 --grad-checkpointing --steps 5 --rounds 3 --sequential --json "$OUT/l16.json"
fi
if [ "$PART" != "step" ]; then
  "$PYTHON" launch/bench_memory.py --device cuda --model ViT-H-14-CL8-Syntax-GAP --setting 84/8 \
    --grad-checkpointing --start 256 --json "$OUT/h14_memory.json"
  "$PYTHON" launch/bench_memory.py --device cuda --model ViT-bigG-14-CL32-GAP-BigVision --setting 70/8 \
    --grad-checkpointing --start 256 --json "$OUT/bigg_memory.json"
fi
