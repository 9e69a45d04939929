#!/usr/bin/env bash
# Run one stage of a preset on GPUs (torchrun) or TPUs (python xla_utils.py launch).
#   launch/stage.sh gpu|tpu PRESET STAGE [extra train.py/finetune.py flags...]
# The per-experiment wrappers in launch/gpu/ and launch/tpu/ call this. Paths come from the environment:
#   TRAIN_DATA   shards: /data/laion/{00000..41407}.tar, a TFRecord glob, or a TFDS directory (required)
#   OUT          output directory: checkpoints, metrics.jsonl, logs (required); re-running the same
#                command after a preemption continues from its newest checkpoint (--resume auto)
#   PRETRAINED   checkpoint of the previous stage (required for fine-tune stages)
#   IMAGENET_VAL ImageNet val/ ImageFolder or TFDS dir: zero-shot eval every EVAL_EVERY steps (optional)
#   NPROC (GPUs per node, default: all visible), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (multi-node)
#   MAX_RESTARTS gpu: torchrun's --max-restarts (default 0; more uses its c10d rendezvous): a rank that
#                dies outright restarts the group, which continues from the newest checkpoint (--resume auto)
#   PYTHON       interpreter (default: python)
#   DRY_RUN=1    print the resolved command and the resolved stage config, run nothing
set -euo pipefail
die() { echo "error: $*" >&2; exit 2; }
[ $# -ge 3 ] || die "usage: launch/stage.sh gpu|tpu PRESET STAGE [flags...]"
platform=$1 preset=$2 stage=$3; shift 3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

[ -n "${TRAIN_DATA:-}" ] || die "TRAIN_DATA is not set (training shards, e.g. /data/laion400m/{00000..41407}.tar)"
[ -n "${OUT:-}" ] || die "OUT is not set (output directory for checkpoints and logs)"
# --resume auto: the same command starts the run and continues it from OUT's newest checkpoint after a stop
args=(--cfg "$preset" --stage "$stage" --train-data "$TRAIN_DATA" --out "$OUT" --resume auto)
script=train.py
if [ "$stage" != "pretrain" ]; then   # every later stage starts from the previous stage's weights
  script=finetune.py
  [ -n "${PRETRAINED:-}" ] || die "PRETRAINED is not set (checkpoint of the stage before '$stage', e.g. the previous stage's --out directory, whose checkpoints/latest names its last checkpoint)"
  args+=(--pretrained "$PRETRAINED")
fi
if [ -n "${IMAGENET_VAL:-}" ]; then
  args+=(--eval-data "$IMAGENET_VAL" --eval-every "${EVAL_EVERY:-2000}")
fi

case "$platform" in
  gpu)
    nproc="${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
    [ "$nproc" -ge 1 ] 2>/dev/null || nproc=8
    if [ "${MAX_RESTARTS:-0}" = "0" ]; then
      nodes=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
    else  # restarted ranks meet again through the c10d store (the static rendezvous cannot re-form a group)
      nodes=(--max-restarts "$MAX_RESTARTS" --rdzv_backend c10d --rdzv_id clipa
             --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}")
    fi
    cmd=(torchrun --nproc_per_node "$nproc" --nnodes "${NNODES:-1}" "${nodes[@]}"
         "$script" "${args[@]}" --device cuda "$@") ;;
  tpu)
    cmd=("$PYTHON" xla_utils.py launch "$script" "${args[@]}" --device xla "$@") ;;
  *) die "platform must be gpu or tpu, got '$platform'" ;;
esac

cd "$ROOT"
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf 'command:'; printf ' %q' "${cmd[@]}"; echo   # shell-quoted: pastes as it is
  exec "$PYTHON" "$script" "${args[@]}" "$@" --dry-run
fi
{ printf '[launch]'; printf ' %q' "${cmd[@]}"; echo; } >&2
exec "${cmd[@]}"
