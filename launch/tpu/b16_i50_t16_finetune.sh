#!/usr/bin/env bash
# CLIPA-v1 B/16 fine-tune at 224 px -- stage 'finetune' of preset b16_i50_t16 on a TPU VM / pod host (PJRT).
# Needs TRAIN_DATA and OUT, PRETRAINED; DRY_RUN=1 prints the command and resolved config.
# Re-run it as it is after a preemption: it continues from the newest checkpoint in OUT (--resume auto).
exec "$(dirname "$0")/../stage.sh" tpu b16_i50_t16 finetune "$@"
