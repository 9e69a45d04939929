#!/usr/bin/env bash
# CLIPA-v2 l14 pre-train at 84 px / 8 tokens -- stage 'pretrain' of preset l14_v2 on a TPU VM / pod host (PJRT).
# Needs TRAIN_DATA and OUT; DRY_RUN=1 prints the command and resolved config.
# Re-run it as it is after a preemption: it continues from the newest checkpoint in OUT (--resume auto).
exec "$(dirname "$0")/../stage.sh" tpu l14_v2 pretrain "$@"
