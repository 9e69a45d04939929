#!/usr/bin/env bash
# CLIPA-v2 h14 fine-tune at 336 px, 40% random masking -- stage 'ft336' of preset h14_v2 on 8 GPUs with torchrun (NPROC to change).
# Needs TRAIN_DATA and OUT, PRETRAINED; DRY_RUN=1 prints the command and resolved config.
exec "$(dirname "$0")/../stage.sh" gpu h14_v2 ft336 "$@"
