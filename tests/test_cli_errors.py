"""Wrong invocations of every command-line tool, as users type them: each is refused with exactly one
line on stderr ("error: ..."), exit status 2, and no traceback, before any work starts. The mains
run in-process (fast); a few run as real processes to see what a shell sees."""

import glob
import os

import bench_data
import bench_e2e
import bench_memory
import bench_remote
import bench_step
import bench_tokenizer
import demo
import demo_data
import pytest
import sweep
from PIL import Image
from runs import PY, REPO, run

import data
import eval_zeroshot
import export
import factory
import model
import train
import xla_utils

NOPE = "/nonexistent/path"
TMP = "<tmp>"  # stands for the test's directory in an argument: it holds the files _inputs writes


def _finetune(argv):
    return train.main(argv, prog="finetune.py", finetune=True)


# script (its path in the repository) -> its main, called with argv
MAINS = {
    "train.py": train.main,
    "finetune.py": _finetune,
    "eval_zeroshot.py": eval_zeroshot.main,
    "export.py": export.main,
    "factory.py": factory.main,
    "model.py": model.main,
    "data.py": data.main,
    "xla_utils.py": xla_utils.main,
    "launch/demo.py": demo.main,
    "launch/demo_data.py": demo_data.main,
    "launch/bench_data.py": bench_data.main,
    "launch/bench_e2e.py": bench_e2e.main,
    "launch/bench_memory.py": bench_memory.main,
    "launch/bench_remote.py": bench_remote.main,
    "launch/bench_step.py": bench_step.main,
    "launch/bench_tokenizer.py": bench_tokenizer.main,
    "launch/sweep.py": sweep.main,
}

TINY = ["--cfg", "demo", "--dry-run"]
RANDOM = ["--random-init", "--model", "ViT-Test-8-CL16"]
# (script, argv, what its one error line says)
CASES = [
    # train.py: flags, values, presets, stages, fields
    ("train.py", [], "--cfg"),
    ("train.py", ["--cfg", "nope"], "unknown preset"),
    ("train.py", ["--cfg", "demo", "--bogus"], "unrecognized arguments"),
    ("train.py", TINY + ["--batch-size", "many"], "bad value 'many'"),
    ("train.py", TINY + ["--batch-size", "0"], "batch_size must be >= 1"),
    ("train.py", TINY + ["--batch-size", "-4"], "batch_size must be >= 1"),
    ("train.py", TINY + ["--image-size", "0"], "image_size must be >= 1"),
    ("train.py", TINY + ["--image-size", "30"], "not a multiple of the patch size"),
    ("train.py", TINY + ["--warmup", "-5"], "warmup and weight_decay must be >= 0"),
    ("train.py", TINY + ["--weight-decay", "-1"], "warmup and weight_decay must be >= 0"),
    ("train.py", TINY + ["--scale-min", "0"], "scale_min must be in (0, 1]"),
    ("train.py", TINY + ["--scale-min", "2"], "scale_min must be in (0, 1]"),
    ("train.py", TINY + ["--mask-ratio", "1.5"], "mask ratio must be in [0, 1)"),
    ("train.py", TINY + ["--mask", "cutout"], "valid: none, random, grid, block"),
    ("train.py", TINY + ["--text-reduction", "magic"], "text_reduction='magic'"),
    ("train.py", TINY + ["--text-reduction", "frequency"], "needs word counts: give --word-counts"),
    ("train.py", TINY + ["--text-reduction", "frequency", "--word-counts", NOPE], "No such file"),
    ("train.py", TINY + ["--text-reduction", "frequency", "--word-counts", f"{TMP}/a_file"], "not JSON"),
    ("train.py", TINY + ["--context-length", "0"], "context_length must be >= 1"),
    ("train.py", TINY + ["--model", "ViT-Nope"], "unknown model 'ViT-Nope'"),
    ("train.py", TINY + ["--stage", "ft9"], "unknown stage 'ft9'"),
    ("train.py", TINY + ["--set", "colour=1"], "unknown field 'colour'"),
    ("train.py", TINY + ["--set", "warmup"], "--set expects [STAGE.]FIELD=VALUE"),
    ("train.py", TINY + ["--train-num-samples", "8"], "no step to run"),
    ("train.py", TINY + ["--accum-steps", "0"], "--accum-steps must be >= 1"),
    ("train.py", TINY + ["--keep", "0"], "--keep must be >= 1"),
    ("train.py", TINY + ["--workers", "-1"], "--workers must be >= 0"),
    ("train.py", TINY + ["--device", "tpu"], "invalid choice: 'tpu'"),
    ("train.py", TINY + ["--precision", "fp16"], "invalid choice: 'fp16'"),
    ("train.py", TINY + ["--report-to", "tensorboard,mlflow"], "unknown tracker 'mlflow'"),
    ("train.py", ["--cfg", "demo", "--train-data", f"{TMP}/pairs.csv", "--out", f"{TMP}/o"], "; pass --train-format"),
    ("train.py", ["--cfg", "demo", "--train-data", NOPE + "/{0..3}.tar"], "/nonexistent/path/0.tar"),
    ("train.py", ["--cfg", "b16_i50_t16", "--stage", "pretrain"], "no training data"),
    ("train.py", ["--cfg", "demo", "--train-data", f"{TMP}/empty", "--out", f"{TMP}/o"], "no .tar/.tfrecord"),
    ("train.py", ["--cfg", "demo", "--pretrained", NOPE], "--pretrained: no such file"),
    ("train.py", ["--cfg", "demo", "--train-data", f"{TMP}/val", "--out", f"{TMP}/a_file"], "is a file, not a dir"),
    # train.py: where a run writes and what it reads checkpoints from
    ("train.py", ["--cfg", "demo", "--train-data", f"{TMP}/val", "--out", "http://h/run"], "http: is read only"),
    ("train.py", ["--cfg", "demo", "--train-data", f"{TMP}/val", "--out", "gs:/bucket/run"], "did you mean gs://"),
    ("train.py", ["--cfg", "demo", "--train-data", f"{TMP}/val", "--out", "ftp://h/run"], "unsupported storage scheme"),
    ("train.py", ["--cfg", "demo", "--pretrained", "hdfs://h/ckpt"], "unsupported storage scheme"),
    ("train.py", ["--cfg", "demo", "--pretrained", "pipe:cat ckpt"], "not a pipe:"),
    ("train.py", ["--cfg", "demo", "--resume", "ftp://h/ckpt"], "unsupported storage scheme"),
    ("train.py", ["--cfg", "demo", "--resume", "pipe:cat ckpt"], "not a pipe:"),
    ("train.py", ["--cfg", "demo", "--train-data", "ftp://h/{0..3}.tar", "--out", f"{TMP}/o"], "unsupported storage"),
    ("train.py", ["--cfg", "demo", "--train-data", f"{TMP}/val", "--out", f"{TMP}/ran"], "already holds checkpoints"),
    ("finetune.py", ["--cfg", "demo"], "--pretrained"),
    (
        "finetune.py",
        ["--cfg", "demo", "--pretrained", f"{TMP}/val", "--out", f"{TMP}/ran"],
        "already holds checkpoints",
    ),
    ("finetune.py", ["--cfg", "demo", "--pretrained", "pipe:cat ckpt"], "not a pipe:"),
    ("finetune.py", ["--cfg", "demo", "--pretrained", NOPE], "--pretrained: no such file"),
    # eval_zeroshot.py
    ("eval_zeroshot.py", [], "required"),
    ("eval_zeroshot.py", ["--ckpt", NOPE, "--data", TMP], "not found"),
    ("eval_zeroshot.py", ["--random-init", "--data", TMP], "--random-init needs --model"),
    ("eval_zeroshot.py", ["--random-init", "--model", "ViT-Nope", "--data", f"{TMP}/val"], "unknown model"),
    ("eval_zeroshot.py", RANDOM + ["--data", NOPE], "not found"),
    ("eval_zeroshot.py", RANDOM + ["--data", f"{TMP}/empty"], "no class sub-directories"),
    ("eval_zeroshot.py", RANDOM + ["--data", f"{TMP}/val", "--batch-size", "0"], "--batch-size must be >= 1"),
    ("eval_zeroshot.py", RANDOM + ["--data", f"{TMP}/val", "--templates", f"{TMP}/templates.txt"], "placeholder"),
    ("eval_zeroshot.py", RANDOM + ["--data", f"{TMP}/val", "--device", "gpu"], "invalid choice"),
    ("eval_zeroshot.py", RANDOM + ["--data", f"{TMP}/val", "--split", "test"], "an ImageFolder tree has no splits"),
    ("eval_zeroshot.py", RANDOM + ["--imagenet-val", f"{TMP}/val"], "2 classes but 1000 class names"),
    ("eval_zeroshot.py", RANDOM + ["--data", f"{TMP}/val", "--out", f"{TMP}/a_file/r.json"], "a_file is a file"),
    # export.py
    ("export.py", [NOPE, "out/"], "--to"),
    ("export.py", [NOPE, "--to", "open_clip", f"{TMP}/out/"], "not found"),
    ("export.py", [NOPE, "--to", "open_clip", NOPE + "/model.pt"], "output directory does not exist"),
    ("export.py", [NOPE, "--to", "open_clip", f"{TMP}/val/"], "is not empty"),
    # factory.py
    ("factory.py", [], "required"),
    ("factory.py", ["tokenize", "--model", "ViT-Nope", "a dog"], "unknown model"),
    ("factory.py", ["tokenize", "--reduction", "magic", "a dog"], "invalid choice"),
    # model.py
    ("model.py", [], "required"),
    ("model.py", ["flops", "ViT-Nope"], "unknown model"),
    ("model.py", ["flops", "ViT-B-16-CL16", "--image-size", "100"], "not a positive multiple"),
    ("model.py", ["flops", "ViT-B-16-CL16", "--context-length", "0"], "context length must be positive"),
    ("model.py", ["flops", "ViT-B-16-CL16", "--mask-ratio", "1"], "mask ratio must be in [0, 1)"),
    # data.py
    ("data.py", ["stats"], "required"),
    ("data.py", ["stats", NOPE + "/{0..1}.tar"], "/nonexistent/path/0.tar"),
    ("data.py", ["stats", f"{TMP}/a_file", "--format", "zip"], "invalid choice"),
    ("data.py", ["stats", f"{TMP}/pairs.csv"], "; pass --format"),
    ("data.py", ["counts", f"{TMP}/a_file"], "required: --out"),
    ("data.py", ["counts", NOPE + "/{0..1}.tar", "--out", f"{TMP}/c.json"], "/nonexistent/path/0.tar"),
    ("data.py", ["counts", f"{TMP}/a_file", "--out", f"{TMP}/c.json", "--tokenizer", "spm"], "invalid choice"),
    # xla_utils.py
    ("xla_utils.py", ["launch", "nope.py"], "script not found"),
    ("xla_utils.py", ["launch", "--device", "xla", "--nproc", "4", "train.py"], "one process per host"),
    ("xla_utils.py", ["launch", "--device", "cuda", "train.py"], "no CUDA GPU"),
    ("xla_utils.py", ["frobnicate"], "invalid choice"),
    # launch/ scripts
    ("launch/demo.py", ["--only", "mystery"], "unknown variant 'mystery'"),
    ("launch/demo.py", ["--n-val", "100"], "a multiple of 36"),
    ("launch/demo.py", ["--pretrain-samples", "0"], "--pretrain-samples must be >= 32"),
    ("launch/demo.py", ["--out", f"{TMP}/a_file"], "is a file"),
    ("launch/demo.py", ["--seeds", "0"], "--seeds must be >= 1"),
    ("launch/sweep.py", ["--sizes", "S,XXL"], "unknown size 'XXL'"),
    ("launch/sweep.py", ["--image-px", "20"], "multiple of the patch size 8"),
    ("launch/sweep.py", ["--reductions", "syntax,nope"], "unknown reduction 'nope'"),
    ("launch/sweep.py", ["--out", f"{TMP}/a_file"], "is a file"),
    ("launch/demo_data.py", [], "required"),
    ("launch/demo_data.py", [f"{TMP}/d", "--n-val", "10"], "multiple of 36"),
    ("launch/bench_data.py", ["synth", f"{TMP}/s", "--size", "big"], "400x300"),
    ("launch/bench_data.py", ["bench", NOPE + "/{0..1}.tar"], "/nonexistent/path/0.tar"),
    ("launch/bench_e2e.py", [], "--train-data"),
    ("launch/bench_e2e.py", ["--train-data", NOPE, "--steps", "0"], "--steps, --rounds and --log-every must be >= 1"),
    ("launch/bench_e2e.py", ["--train-data", NOPE + "/{0..1}.tar"], "/nonexistent/path/0.tar"),
    ("launch/bench_remote.py", ["--rounds", "0"], "--steps, --rounds and --log-every must be >= 1"),
    ("launch/bench_remote.py", ["--steps", "x"], "--steps"),
    ("launch/bench_memory.py", ["--setting", "84"], "SIZE/CTX"),
    ("launch/bench_memory.py", ["--start", "0"], "--start, --limit and --steps must be >= 1"),
    ("launch/bench_memory.py", ["--model", "ViT-Nope"], "unknown model"),
    ("launch/bench_tokenizer.py", ["--n", "0"], ">= 1"),
    ("launch/bench_step.py", ["--settings", "112"], "SIZE/CTX"),
    ("launch/bench_step.py", ["--model", "ViT-Nope"], "unknown model"),
]


def _case_id(case) -> str:
    script, argv, _ = case
    shown = argv[len(TINY) :] if argv[: len(TINY)] == TINY else argv
    return f"{script} {' '.join(shown)}".replace(TMP + "/", "").strip()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
    """The directory TMP stands for: a plain file, a templates file without "{}", an empty directory and a
    two-class ImageFolder."""
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "a_file").write_text("x")
    (tmp / "templates.txt").write_text("a photo\n")
    (tmp / "pairs.csv").write_text("filepath\ttitle\nimages/0.jpg\ta dog\n")  # OpenCLIP's csv dataset
    (tmp / "empty").mkdir()
    (tmp / "ran" / "checkpoints" / "step_00000003").mkdir(parents=True)  # an earlier run's output
    (tmp / "ran" / "checkpoints" / "latest").write_text("step_00000003\n")
    for c in ("cat", "dog"):
        (tmp / "val" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp / "val" / c / "0.png")
    return str(tmp)


@pytest.mark.parametrize("script, argv, needle", CASES, ids=[_case_id(c) for c in CASES])
def test_a_wrong_invocation_is_a_one_line_error(script, argv, needle, inputs, capsys):
    try:
        status = MAINS[script]([a.replace(TMP, inputs) for a in argv])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    assert status == 2, out.err[-300:]
    assert len(out.err.splitlines()) == 1 and out.err.startswith("error: "), out.err[-300:]
    assert needle in out.err


def test_every_command_line_tool_has_its_wrong_invocations():
    """The table covers each script a user runs (a file with a __main__ block), so a new tool is a failure
    here until its errors are tried."""
    scripts = set()
    for path in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "launch", "*.py")):
        with open(path, encoding="utf-8") as f:
            if 'if __name__ == "__main__":' in f.read():
                scripts.add(os.path.relpath(path, REPO))
    assert set(MAINS) == scripts
    assert {script for script, _, _ in CASES} == scripts


@pytest.mark.slow
@pytest.mark.parametrize(
    "cmd",
    [
        ["train.py", "--cfg", "demo", "--batch-size", "0"],
        ["train.py", "--cfg", "demo", "--train-data", NOPE + "/{0..1}.tar"],
        ["finetune.py", "--cfg", "demo", "--pretrained", NOPE, "--train-data", REPO],
        ["eval_zeroshot.py", "--ckpt", NOPE, "--data", NOPE],
        ["data.py", "stats", NOPE],
        ["launch/demo.py", "--only", "mystery"],
    ],
    ids=lambda c: " ".join(c).replace(REPO, "REPO"),
)
def test_as_a_shell_sees_it(cmd):
    """One line on stderr even as a process (no TensorFlow start-up noise, no usage block)."""
    p = run([PY, *cmd], timeout=120, TF_CPP_MIN_LOG_LEVEL="0")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and not p.stdout
