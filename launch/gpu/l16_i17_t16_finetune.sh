#!/usr/bin/env bash
# CLIPA-v1 L/16 fine-tune at 224 px / 16 tokens -- stage 'finetune' of preset l16_i17_t16 on 8 GPUs with torchrun (NPROC to change).
# Needs TRAIN_DATA and OUT, PRETRAINED; DRY_RUN=1 prints the command and resolved config.
# Re-run it as it is after a preemption: it continues from the newest checkpoint in OUT (--resume auto).
exec "$(dirname "$0")/../stage.sh" gpu l16_i17_t16 finetune "$@"
