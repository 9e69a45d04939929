#!/usr/bin/env bash
# CLIPA-v2 h14 fine-tune at 224 px, 30% random masking -- stage 'ft224' of preset h14_v2 on a TPU VM / pod host (PJRT).
# Needs TRAIN_DATA and OUT, PRETRAINED; DRY_RUN=1 prints the command and resolved config.
# Re-run it as it is after a preemption: it continues from the newest checkpoint in OUT (--resume auto).
exec "$(dirname "$0")/../stage.sh" tpu h14_v2 ft224 "$@"
