"""Wrong invocations of every command-line tool, as users type them: each is refused with exactly one
line on stderr ("error: ..."), exit status 2, and no traceback, before any work starts. The mains
run in-process (fast); a few run as real processes to see what a shell sees."""

import os

import bench_data  # noqa: E402  (launch/)
import bench_step
import bench_tokenizer
import demo
import demo_data
import pytest
from PIL import Image
from runs import PY, run

import data
import eval_zeroshot
import model
import train
import xla_utils

NOPE = "/nonexistent/path"


def _finetune(argv):
    return train.main(argv, prog="finetune.py", finetune=True)


def _cases(tmp):
    afile = os.path.join(tmp, "a_file")
    open(afile, "w").write("x")
    no_braces = os.path.join(tmp, "templates.txt")
    open(no_braces, "w").write("a photo\n")
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    folder = os.path.join(tmp, "val")  # a two-class ImageFolder
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(folder, c))
        Image.new("RGB", (8, 8)).save(os.path.join(folder, c, "0.png"))
    tiny = ["--cfg", "demo", "--dry-run"]
    return [
        # train.py: flags, values, presets, stages, fields
        (train.main, [], "--cfg"),
        (train.main, ["--cfg", "nope"], "unknown preset"),
        (train.main, ["--cfg", "demo", "--bogus"], "unrecognized arguments"),
        (train.main, tiny + ["--batch-size", "many"], "bad value 'many'"),
        (train.main, tiny + ["--batch-size", "0"], "batch_size must be >= 1"),
        (train.main, tiny + ["--batch-size", "-4"], "batch_size must be >= 1"),
        (train.main, tiny + ["--image-size", "0"], "image_size must be >= 1"),
        (train.main, tiny + ["--image-size", "30"], "not a multiple of the patch size"),
        (train.main, tiny + ["--warmup", "-5"], "warmup and weight_decay must be >= 0"),
        (train.main, tiny + ["--weight-decay", "-1"], "warmup and weight_decay must be >= 0"),
        (train.main, tiny + ["--scale-min", "0"], "scale_min must be in (0, 1]"),
        (train.main, tiny + ["--scale-min", "2"], "scale_min must be in (0, 1]"),
        (train.main, tiny + ["--mask-ratio", "1.5"], "mask ratio must be in [0, 1)"),
        (train.main, tiny + ["--mask", "cutout"], "valid: none, random, grid, block"),
        (train.main, tiny + ["--text-reduction", "magic"], "text_reduction='magic'"),
        (train.main, tiny + ["--context-length", "0"], "context_length must be >= 1"),
        (train.main, tiny + ["--model", "ViT-Nope"], "unknown model 'ViT-Nope'"),
        (train.main, tiny + ["--stage", "ft9"], "unknown stage 'ft9'"),
        (train.main, tiny + ["--set", "colour=1"], "unknown field 'colour'"),
        (train.main, tiny + ["--set", "warmup"], "--set expects [STAGE.]FIELD=VALUE"),
        (train.main, tiny + ["--train-num-samples", "8"], "no step to run"),
        (train.main, tiny + ["--accum-steps", "0"], "--accum-steps must be >= 1"),
        (train.main, tiny + ["--keep", "0"], "--keep must be >= 1"),
        (train.main, tiny + ["--workers", "-1"], "--workers must be >= 0"),
        (train.main, tiny + ["--device", "tpu"], "invalid choice: 'tpu'"),
        (train.main, tiny + ["--precision", "fp16"], "invalid choice: 'fp16'"),
        (train.main, ["--cfg", "demo", "--train-data", NOPE + "/{0..3}.tar"], "/nonexistent/path/0.tar"),
        (train.main, ["--cfg", "b16_i50_t16", "--stage", "pretrain"], "no training data"),
        (train.main, ["--cfg", "demo", "--train-data", empty, "--out", os.path.join(tmp, "o")], "no .tar/.tfrecord"),
        (train.main, ["--cfg", "demo", "--pretrained", NOPE], "--pretrained: no such file"),
        (train.main, ["--cfg", "demo", "--train-data", folder, "--out", afile], "is a file, not a directory"),
        (_finetune, ["--cfg", "demo"], "--pretrained"),
        (_finetune, ["--cfg", "demo", "--pretrained", NOPE], "--pretrained: no such file"),
        # eval_zeroshot.py
        (eval_zeroshot.main, [], "required"),
        (eval_zeroshot.main, ["--ckpt", NOPE, "--data", tmp], "not found"),
        (eval_zeroshot.main, ["--random-init", "--data", tmp], "--random-init needs --model"),
        (eval_zeroshot.main, ["--random-init", "--model", "ViT-Nope", "--data", folder], "unknown model"),
        (eval_zeroshot.main, ["--random-init", "--model", "ViT-Test-8-CL16", "--data", NOPE], "not found"),
        (
            eval_zeroshot.main,
            ["--random-init", "--model", "ViT-Test-8-CL16", "--data", empty],
            "no class sub-directories",
        ),
        (
            eval_zeroshot.main,
            ["--random-init", "--model", "ViT-Test-8-CL16", "--data", folder, "--batch-size", "0"],
            "--batch-size must be >= 1",
        ),
        (
            eval_zeroshot.main,
            ["--random-init", "--model", "ViT-Test-8-CL16", "--data", folder, "--templates", no_braces],
            "placeholder",
        ),
        (
            eval_zeroshot.main,
            ["--random-init", "--model", "ViT-Test-8-CL16", "--data", folder, "--device", "gpu"],
            "invalid choice",
        ),
        (
            eval_zeroshot.main,
            ["--random-init", "--model", "ViT-Test-8-CL16", "--imagenet-val", folder],
            "2 classes but 1000 class names",
        ),
        # model.py
        (model.main, [], "required"),
        (model.main, ["flops", "ViT-Nope"], "unknown model"),
        (model.main, ["flops", "ViT-B-16-CL16", "--image-size", "100"], "not a positive multiple"),
        (model.main, ["flops", "ViT-B-16-CL16", "--context-length", "0"], "context length must be positive"),
        (model.main, ["flops", "ViT-B-16-CL16", "--mask-ratio", "1"], "mask ratio must be in [0, 1)"),
        (model.main, ["tokenize", "--model", "ViT-Nope", "a dog"], "unknown model"),
        (model.main, ["tokenize", "--reduction", "magic", "a dog"], "invalid choice"),
        # data.py
        (data.main, ["stats"], "required"),
        (data.main, ["stats", NOPE + "/{0..1}.tar"], "/nonexistent/path/0.tar"),
        (data.main, ["stats", afile, "--format", "zip"], "invalid choice"),
        # xla_utils.py
        (xla_utils.main, ["launch", "nope.py"], "script not found"),
        (xla_utils.main, ["launch", "--device", "xla", "--nproc", "4", "train.py"], "one process per host"),
        (xla_utils.main, ["launch", "--device", "cuda", "train.py"], "no CUDA GPU"),
        (xla_utils.main, ["frobnicate"], "invalid choice"),
        # launch/ scripts
        (demo.main, ["--only", "mystery"], "unknown variant 'mystery'"),
        (demo.main, ["--n-val", "100"], "a multiple of 36"),
        (demo.main, ["--pretrain-samples", "0"], "--pretrain-samples must be >= 32"),
        (demo.main, ["--out", afile], "is a file"),
        (demo_data.main, [], "required"),
        (demo_data.main, [os.path.join(tmp, "d"), "--n-val", "10"], "multiple of 36"),
        (bench_data.main, ["synth", os.path.join(tmp, "s"), "--size", "big"], "400x300"),
        (bench_data.main, ["bench", NOPE + "/{0..1}.tar"], "/nonexistent/path/0.tar"),
        (bench_tokenizer.main, ["--n", "0"], ">= 1"),
        (bench_step.main, ["--settings", "112"], "SIZE/CTX"),
        (bench_step.main, ["--model", "ViT-Nope"], "unknown model"),
    ]


def test_at_least_sixty_wrong_invocations_are_one_line_errors(tmp_path, capsys):
    cases = _cases(str(tmp_path))
    assert len(cases) >= 60
    bad = []
    for fn, argv, needle in cases:
        try:
            status = fn(argv)
        except SystemExit as e:
            status = e.code
        out = capsys.readouterr()
        lines = out.err.splitlines()
        if status != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or needle not in lines[0]:
            bad.append((fn.__module__, argv, status, out.err[-300:]))
    assert not bad, "\n".join(map(repr, bad))


@pytest.mark.parametrize(
    "cmd",
    [
        ["train.py", "--cfg", "demo", "--batch-size", "0"],
        ["train.py", "--cfg", "demo", "--train-data", NOPE + "/{0..1}.tar"],
        ["eval_zeroshot.py", "--ckpt", NOPE, "--data", NOPE],
        ["data.py", "stats", NOPE],
        ["launch/demo.py", "--only", "mystery"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_as_a_shell_sees_it(cmd):
    """One line on stderr even as a process (no TensorFlow start-up noise, no usage block)."""
    p = run([PY, *cmd], timeout=120, TF_CPP_MIN_LOG_LEVEL="0")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and not p.stdout
