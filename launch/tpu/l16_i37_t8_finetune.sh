#!/usr/bin/env bash
# CLIPA-v1 L/16 fine-tune at 224 px / 32 tokens -- stage 'finetune' of preset l16_i37_t8 on a TPU VM / pod host (PJRT).
# Needs TRAIN_DATA and OUT, PRETRAINED; DRY_RUN=1 prints the command and resolved config.
# Re-run it as it is after a preemption: it continues from the newest checkpoint in OUT (--resume auto).
exec "$(dirname "$0")/../stage.sh" tpu l16_i37_t8 finetune "$@"
