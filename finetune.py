"""CLIPA fine-tuning: run a preset's fine-tune stage(s) from a pre-trained checkpoint.

    python finetune.py --cfg l16_i37_t8 --pretrained runs/l16_i37_t8/checkpoints/step_00078125 \
        --train-data '/data/laion/{00000..41407}.tar'
    python finetune.py --cfg h14_v2 --pretrained PRE --stage ft224      # one stage of the schedule

The pre-trained weights are loaded with factory.create_model(..., pretrained=...), which resizes the
image position table to the new grid (bicubic) and the text table to the new context length, and
switches to learnable image position embeddings where the stage says so (v1 fine-tunes); the stage's
masking (v2: 30% / 40% random) applies in training. Everything else (the step, checkpoints, resume,
logging) is train.py's: this file only selects the stages that start from a previous one and makes
--pretrained required.
"""

import sys

import train

if __name__ == "__main__":
    sys.exit(train.main(prog="finetune.py", finetune=True))
