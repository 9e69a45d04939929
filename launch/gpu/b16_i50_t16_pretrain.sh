#!/usr/bin/env bash
# CLIPA-v1 B/16 pre-train at 112 px (I50) / 16 tokens -- stage 'pretrain' of preset b16_i50_t16 on 8 GPUs with torchrun (NPROC to change).
# Needs TRAIN_DATA and OUT; DRY_RUN=1 prints the command and resolved config.
# Re-run it as it is after a preemption: it continues from the newest checkpoint in OUT (--resume auto).
exec "$(dirname "$0")/../stage.sh" gpu b16_i50_t16 pretrain "$@"
