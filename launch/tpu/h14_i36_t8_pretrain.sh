#!/usr/bin/env bash
# CLIPA H/14 pre-train at 84 px (I36) / 8 syntax-masked tokens -- stage 'pretrain' of preset h14_i36_t8 on a TPU VM / pod host (PJRT).
# Needs TRAIN_DATA and OUT; DRY_RUN=1 prints the command and resolved config.
exec "$(dirname "$0")/../stage.sh" tpu h14_i36_t8 pretrain "$@"
