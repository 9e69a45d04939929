#!/usr/bin/env bash
# CLIPA-v1 L/16 pre-train at 96 px (I37) / 8 syntax-masked tokens -- stage 'pretrain' of preset l16_i37_t8 on 8 GPUs with torchrun (NPROC to change).
# Needs TRAIN_DATA and OUT; DRY_RUN=1 prints the command and resolved config.
# Re-run it as it is after a preemption: it continues from the newest checkpoint in OUT (--resume auto).
exec "$(dirname "$0")/../stage.sh" gpu l16_i37_t8 pretrain "$@"
