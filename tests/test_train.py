"""train.py / finetune.py: presets, the contrastive step on every runtime, checkpoints, resume,
fine-tuning and the demo, on the CPU (torchrun/gloo, and XLA's PJRT CPU client)."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import time
import typing

import pytest
import torch
from open_clip.loss import ClipLoss
from open_clip_train.scheduler import cosine_lr
from runs import PY, free_port, same_weights
from runs import env as _env
from runs import losses as _losses
from runs import run as _run
from runs import tiny_demo_args as _tiny_demo_args
from runs import train as _train
from safetensors import safe_open

import config
import data
import eval_zeroshot
import export
import factory
import losses
import model
import tokenizer
import train
import xla_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- presets and CLI


def test_presets_follow_the_paper_recipe():
    """lr = base x global batch / 256 reproduces docs/recipe.md's table; stage layouts."""
    want = {  # preset: [(model, image size, batch, lr, warmup, samples)]
        "b16_i50_t16": [
            ("ViT-B-16-CL16", 112, 65536, 2.048e-3, 782, 2_560_000_000),
            ("ViT-B-16-CL16", 224, 8192, 2.56e-5, 3072, 131_072_000),
        ],
        "l16_i17_t16": [
            ("ViT-L-16-CL16-Syntax-GAP", 64, 32768, 1.024e-3, 1563, 2_560_000_000),
            ("ViT-L-16-CL16-GAP", 224, 7168, 2.24e-5, 3571, 131_072_000),
        ],
        "l16_i37_t8": [
            ("ViT-L-16-CL8-Syntax-GAP", 96, 32768, 1.024e-3, 1563, 2_560_000_000),
            ("ViT-L-16-CL32-GAP", 224, 7168, 2.24e-5, 3571, 131_072_000),
        ],
        "h14_v2": [
            ("ViT-H-14-CL8-Syntax-GAP", 84, 65536, 2.048e-3, 782, 12_811_670_000),
            ("ViT-H-14-CL32-GAP", 224, 32768, 5.12e-5, 800, 524_288_000),
            ("ViT-H-14-CL32-GAP", 336, 16384, 6.4e-6, 1600, 131_072_000),
        ],
    }
    for name, rows in want.items():
        stages = [s for _, s in config.resolve_stages(name)]
        got = [(s.model, s.image_size, s.batch_size, s.resolved_lr, s.warmup, s.train_num_samples) for s in stages]
        for g, w in zip(got, rows, strict=True):
            assert g[:3] == w[:3] and g[4:] == w[4:] and g[3] == pytest.approx(w[3], rel=1e-9), (name, g, w)
    v2 = config.PRESETS["h14_v2"].stages
    assert [(s.mask, s.mask_ratio) for s in v2] == [("none", 0.0), ("random", 0.3), ("random", 0.4)]
    assert [s.pos_embed for s in config.PRESETS["l16_i37_t8"].stages] == ["sincos", "learnable"]
    # every preset's models exist in model.py's registry with the stage's overrides
    for p in config.PRESETS.values():
        for s in p.stages:
            cfg = model.get_model_config(
                s.model,
                image_size=s.image_size,
                context_length=s.context_length,
                pos_embed=s.pos_embed,
                mask=s.mask,
                mask_ratio=s.mask_ratio,
            )
            assert cfg.vision.image_size == s.image_size


def test_cli_overrides_and_dry_run(capsys):
    """Stage flags apply to every selected stage, --set STAGE.FIELD to one; the lr rule follows the
    overridden batch unless the lr itself is set; finetune.py selects the fine-tune stages."""
    rc = train.main(
        [
            "--cfg",
            "l16_i37_t8",
            "--dry-run",
            "--batch-size",
            "4096",
            "--set",
            "finetune.warmup=7",
            "--train-data",
            "/x/{0..9}.tar",
            "--set",
            "0.lr=1e-3",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    pre, ft = (json.loads(line) for line in lines[1:])
    assert (pre["batch_size"], ft["batch_size"]) == (4096, 4096)
    assert pre["lr"] == 1e-3 and ft["lr"] == pytest.approx(8e-7 * 4096 / 256)  # rule still applies
    assert (pre["warmup"], ft["warmup"]) == (1563, 7)
    assert pre["train_data"] == ft["train_data"] == "/x/{0..9}.tar"
    assert pre["steps"] == 2_560_000_000 // 4096

    # finetune.py selects the fine-tune stages
    rc = train.main(["--cfg", "h14_v2", "--dry-run", "--pretrained", REPO], prog="finetune.py", finetune=True)
    assert rc == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.strip().splitlines()[1:]] == ["ft224", "ft336"]


def test_dry_run_checks_what_a_run_would_reject_and_nothing_it_needs_not(capsys):
    """--dry-run resolves and validates the stages (an unknown model is exit 2, as in a real run) but
    reads no files: finetune.py --dry-run does not need the --pretrained checkpoint to exist."""
    assert train.main(["--cfg", "demo", "--dry-run", "--model", "ViT-Nope"]) == 2
    assert "unknown model 'ViT-Nope'" in capsys.readouterr().err
    for argv in (
        ["--image-size", "0"],
        ["--batch-size", "0"],
        ["--warmup", "-5"],
        ["--weight-decay", "-1"],
        ["--scale-min", "0"],
        ["--scale-min", "2"],
        ["--image-size", "30"],
    ):
        assert train.main(["--cfg", "demo", "--dry-run", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: stage ") and err.count("\n") == 1, (argv, err)
    assert (
        train.main(
            ["--cfg", "demo", "--dry-run", "--pretrained", "/not/yet/trained"], prog="finetune.py", finetune=True
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[1])["name"] == "finetune"


def _sample_text(name: str, annotation, choices, low=0) -> str:
    """A valid command-line value for a field, other than its default."""
    if choices and name != "text_reduction":  # its last, frequency, needs a counts file (tested below)
        return str(choices[-1])
    samples = {
        "text_reduction": "block",
        "model": "ViT-Tiny-8-CL32-GAP",
        "stage": "finetune",
        "cfg": "demo",
        "train_format": "wds",
        "train_data_weights": "2",
        "eval_templates": "short",
        "report_to": "wandb,tensorboard",
    }
    if name in samples:
        return samples[name]
    kinds = typing.get_args(annotation) or (annotation,)
    if bool in kinds:
        return "yes"
    if int in kinds:
        return "64"
    if float in kinds:
        return "2.5" if low >= 1 else "0.5"
    return f"/some/{name}"


def test_every_option_is_settable_from_the_command_line():
    """Each RunConfig field has a flag whose value reaches the RunConfig; each Stage field has a flag
    whose value reaches every selected stage; --help names them all with their help text."""
    usage = " ".join(config.build_parser("train.py").format_help().split())
    run_types = typing.get_type_hints(config.RunConfig)
    for f in dataclasses.fields(config.RunConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in usage and " ".join(f.metadata["help"].split()) in usage, flag
        if f.name == "cfg":
            continue
        if run_types[f.name] is bool:
            argv, want = [flag], True
        else:
            text = _sample_text(f.name, run_types[f.name], f.metadata.get("choices"), f.metadata.get("min", 0))
            argv, want = [flag, text], config.parse_value(f.name, run_types[f.name], text)
        run, _, _ = config.parse_args(["--cfg", "demo", *argv])
        assert getattr(run, f.name) == want, flag
    stage_types = typing.get_type_hints(config.Stage)
    for name, f in config.STAGE_FIELDS.items():
        flag = "--" + name.replace("_", "-")
        assert flag in usage, flag
        text = _sample_text(name, stage_types[name], [c for c in f.metadata.get("choices") or () if c is not None])
        _, stages, _ = config.parse_args(
            ["--cfg", "demo", "--train-num-samples", "64", "--batch-size", "32", flag, text]
        )
        want = config.parse_value(name, stage_types[name], text)
        assert [getattr(s, name) for _, s in stages] == [want, want], flag
    run, _, _ = config.parse_args(["--cfg", "demo"])
    assert run == config.RunConfig(cfg="demo", out=os.path.join("runs", "demo"))  # defaults: the dataclass's


def test_help_lists_the_allowed_values():
    """A flag shown as `--device V` hides argparse's list of choices: its help names them."""
    usage = " ".join(config.build_parser("train.py").format_help().split())
    assert "--device V where to train (one of: auto, cuda, xla, cpu)" in usage
    for f in [*dataclasses.fields(config.RunConfig), *config.STAGE_FIELDS.values()]:
        allowed = [str(c) for c in f.metadata.get("choices") or () if c is not None]
        assert not allowed or f"(one of: {', '.join(allowed)})" in usage, f.name


def test_flops_table_is_derived_from_the_presets(capsys):
    """python train.py --cfg NAME --flops: per stage, the FLOPs counter at the stage's tokens. The
    H/14 v2 rows reproduce the paper's 224 px / 40%-masked 336 px numbers (docs/models.md)."""
    assert train.main(["--cfg", "h14_v2", "--flops"]) == 0
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["pretrain", "ft224", "ft336"]
    assert [r[3].strip() for r in rows] == ["36/36", "179/256", "345/576"]
    assert float(rows[2][5]) == pytest.approx(237.64, abs=0.01)


def test_loss_matches_open_clip_and_schedule():
    """Single process: our loss equals OpenCLIP's ClipLoss; lr equals OpenCLIP's cosine_lr."""
    rt = xla_utils.init_runtime("cpu")
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    assert losses.clip_loss(img, txt, scale, rt).item() == pytest.approx(ClipLoss()(img, txt, scale).item(), abs=1e-6)

    stage = config.Stage(
        "s", model="ViT-Test-8-CL16", image_size=32, batch_size=512, base_lr=8e-6, warmup=5, train_num_samples=512 * 40
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = cosine_lr(opt, stage.resolved_lr, stage.warmup, stage.steps)
    lrs = [train.lr_at(i, stage) for i in range(stage.steps)]
    assert lrs == pytest.approx([ref(i) for i in range(stage.steps)], rel=1e-12)
    assert max(lrs) == pytest.approx(1.6e-5) and min(lrs) > 0  # never exactly 0 (XLA constant)


def test_weight_decay_groups():
    """AdamW decays weight matrices only: the class token, logit scale, biases and norms are exempt."""
    m = factory.create_model("ViT-Test-8-CL16", pos_embed="learnable")
    no_decay, decay = train.param_groups(m, 0.2)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert {
        "logit_scale",
        "visual.class_embedding",
        "visual.ln_pre.weight",
        "text.ln_final.bias",
        "visual.transformer.resblocks.0.attn.in_proj_bias",
    } <= nd
    assert {
        "visual.conv1.weight",
        "visual.proj",
        "text.token_embedding.weight",
        "visual.positional_embedding",
        "text.transformer.resblocks.1.mlp.c_fc.weight",
    } <= d
    assert len(nd) + len(d) == len(names) and not nd & d


# ----------------------------------------------------------------------------- one step, every runtime

STEP_SCRIPT = r"""
import argparse, json, sys, torch
from open_clip.loss import ClipLoss
import config, factory, losses, model, train, transforms, xla_utils
ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("steps", type=int); ap.add_argument("--device", default="auto")
ap.add_argument("--accum", type=int, default=1); ap.add_argument("--compile", action="store_true")
args = ap.parse_args()
out, steps = args.out, args.steps
rt = xla_utils.init_runtime(args.device)
print(rt.describe(), flush=True)
torch.manual_seed(0)                                   # identical init on every rank
m = factory.create_model("ViT-Test-8-CL16").to(rt.device).train()
stage = config.Stage("t", model="ViT-Test-8-CL16", image_size=32, batch_size=8, lr=2e-3, warmup=2,
                    train_num_samples=8 * 100)
opt = train.build_optimizer(m, stage, rt)
wm = rt.wrap_model(m)
g = torch.Generator().manual_seed(123)
B = stage.batch_size
images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g)
tokens = torch.randint(1, 49000, (B, 16), generator=g)
per = B // rt.world_size
mine = slice(rt.rank * per, (rt.rank + 1) * per)       # this rank's rows of the global batch
rec = {"losses": [], "compiles": []}
if rt.kind == "cpu":
    # gather-with-grad semantics against OpenCLIP's ClipLoss(local_loss, gather_with_grad)
    x = transforms.normalize(images[mine], m.cfg.image_mean, m.cfg.image_std)
    fi, ft, s = m(x, tokens[mine])
    fi2, ft2 = fi.detach().requires_grad_(), ft.detach().requires_grad_()
    fi3, ft3 = fi.detach().requires_grad_(), ft.detach().requires_grad_()
    ours = losses.clip_loss(fi2, ft2, s.detach(), rt)
    ref = ClipLoss(local_loss=True, gather_with_grad=True, rank=rt.rank, world_size=rt.world_size)(fi3, ft3, s.detach())
    ours.backward(); ref.backward()
    rec["vs_open_clip"] = [abs(ours.item() - ref.item()), (fi2.grad - fi3.grad).abs().max().item(),
                           (ft2.grad - ft3.grad).abs().max().item()]
step = train.Step(rt, wm, opt, losses.ContrastiveLoss("softmax", rt), accum_steps=args.accum, compiled=args.compile)
real_step = opt.step
def first_step_grads(*a, **k):               # the gradient of the first step, before AdamW scales it
    if "grads" not in rec:
        rec["grads"] = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    return real_step(*a, **k)
opt.step = first_step_grads
def note(loss):
    rec["losses"].append(float(rt.all_reduce_mean(loss.detach().clone())))
    rec["compiles"].append(rt.compile_count())
for i in range(steps):
    loss = step(images[mine], tokens[mine], train.lr_at(i, stage))
    rt.add_step_closure(note, (loss,))
    rt.step_boundary()
if rt.is_master:
    torch.save({"rec": rec, "weights": {k: v.detach().cpu() for k, v in m.state_dict().items()}}, out)
"""


@pytest.fixture(scope="module")
def step_script(tmp_path_factory):
    p = tmp_path_factory.mktemp("step") / "step.py"
    p.write_text(STEP_SCRIPT)
    return p


def _step_run(step_script, tmp, tag, device, steps, launcher=(), **env):
    out = tmp / f"{tag}.pt"
    p = _run([*launcher, str(step_script), str(out), str(steps), "--device", device], **env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=True), p.stdout


@pytest.fixture(scope="module")
def cpu_baseline(step_script, tmp_path_factory):
    return _step_run(step_script, tmp_path_factory.mktemp("base"), "cpu1", "cpu", 4, launcher=(PY,))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(step_script, cpu_baseline, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), each rank half of the same global batch: same losses and
    the same updated weights as one process (gather-with-grad + DDP gradient averaging)."""
    one, out1 = cpu_baseline
    # started by our launcher (torchrun underneath; it appends "--device cpu" to the script's args)
    out = tmp_path / "cpu2.pt"
    p = _run(
        [
            PY,
            "xla_utils.py",
            "launch",
            "--nproc",
            "2",
            "--master-port",
            str(free_port()),
            str(step_script),
            str(out),
            "4",
        ]
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    two, out2 = torch.load(out, weights_only=True), p.stdout
    assert out1.startswith("device: cpu (1 process(es))")
    assert "device: cpu (2 process(es), DDP/gloo)" in out2
    assert max(two["rec"]["vs_open_clip"]) < 1e-6 and max(one["rec"]["vs_open_clip"]) < 1e-6
    assert two["rec"]["losses"] == pytest.approx(one["rec"]["losses"], abs=1e-5)
    assert one["rec"]["losses"][-1] < one["rec"]["losses"][0]
    for k, v in one["weights"].items():
        assert torch.allclose(_no_key_bias(k, two["weights"][k]), _no_key_bias(k, v), atol=1e-5, rtol=0), k
    torch.manual_seed(0)
    init = factory.create_model("ViT-Test-8-CL16").state_dict()
    assert not torch.equal(init["visual.proj"], one["weights"]["visual.proj"])  # it did train


@pytest.mark.slow
def test_two_processes_with_exact_accumulation_match_one(step_script, cpu_baseline, tmp_path):
    """2 gloo processes x 2 accumulation chunks train the same global-batch loss as 1 process in one
    chunk: the same first-step gradients and the same losses within 1e-5."""
    one, _ = cpu_baseline
    out = tmp_path / "acc.pt"
    p = _run(
        [
            PY,
            "xla_utils.py",
            "launch",
            "--nproc",
            "2",
            "--master-port",
            str(free_port()),
            str(step_script),
            str(out),
            "4",
            "--accum",
            "2",
        ]
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert two["rec"]["losses"] == pytest.approx(one["rec"]["losses"], abs=1e-5)
    for k, g in one["rec"]["grads"].items():
        assert torch.allclose(two["rec"]["grads"][k], g, atol=1e-5, rtol=0), k


def _no_key_bias(name, t):
    """Attention's key bias has an exactly-zero true gradient (softmax ignores a per-query constant);
    its float-noise gradient differs between reduction orders and Adam scales noise up to +-lr steps,
    so it is left out of weight comparisons."""
    if name.endswith("attn.in_proj_bias"):
        w = t.shape[0] // 3
        return torch.cat([t[:w], t[2 * w :]])
    return t


# ----------------------------------------------------------------------------- end to end (train.py)


@pytest.mark.slow
def test_kill_and_resume_continue_identically(demo_small, uninterrupted, tmp_path):
    """SIGKILL a run mid pre-train (checkpoints every 3 steps), resume from `latest`: the rest of the
    run - including the stage change to 64 px / 32 tokens / learnable positions / 30% masking - has
    bit-identical losses on the CPU."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [PY, "train.py", *_tiny_demo_args(demo_small, out)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once step 5 is logged
        if metrics.exists() and any(json.loads(line).get("step", 0) >= 5 for line in metrics.read_text().splitlines()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-2000:]
    ck = out / "checkpoints"
    killed_at = (ck / "latest").read_text().strip()
    assert killed_at in ("step_00000003", "step_00000006", "step_00000008", "step_00000009"), killed_at
    stdout = _train(
        _tiny_demo_args(
            demo_small,
            out,
            "--resume",
            "latest",
            "--eval-data",
            demo_small.val_dir,
            "--eval-classnames",
            os.path.join(demo_small.root, "classnames.txt"),
            "--eval-templates",
            os.path.join(demo_small.root, "templates.txt"),
        )
    )
    # the killed run's lock file is still there, its lock is not: taken over, said in one line
    took_over, device = stdout.splitlines()[:2]
    assert took_over.startswith("taking over the lock of a run that ended without releasing it (pid ")
    assert device.startswith("device: cpu (1 process(es)); precision fp32")
    assert f"resuming from {ck / killed_at}" in stdout
    assert not [n for n in os.listdir(ck) if ".tmp" in n]  # a kill mid-save leaves nothing
    want, _ = _losses(uninterrupted)
    got, recs = _losses(out)  # steps after the checkpoint ran twice: the resumed run's records win
    assert sorted(want) == list(range(1, 13)) and sorted(got) == sorted(want)
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]  # bit for bit
    evaluated = {"finetune"} | ({"pretrain"} if killed_at < "step_00000008" else set())
    assert {r["stage"] for r in recs if "eval_top1" in r} == evaluated
    assert all(0 <= r["eval_top1"] <= 1 and r["eval_n"] == 72 for r in recs if "eval_top1" in r)
    rec = next(r for r in recs if r.get("step") == 12 and "loss" in r)
    assert rec["stage"] == "finetune" and rec["stage_step"] == 4 and rec["samples"] == 64
    assert {"lr", "logit_scale", "samples_per_s"} <= set(rec)

    # layout: --keep 1 plus the last checkpoint of the finished pre-train stage (the fine-tune's init)
    assert sorted(os.listdir(ck)) == ["latest", "step_00000008", "step_00000012"]
    final = ck / "step_00000012"
    assert sorted(os.listdir(final)) == ["meta.json", "model.safetensors", "train_state.pt"]
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        pos = f.get_tensor("visual.positional_embedding")
        tpos = f.get_tensor("text.positional_embedding")
    assert meta["format"] == "clipa" and meta["model_name"] == "ViT-Tiny-8-CL32-GAP"
    assert factory.config_from_metadata(meta).vision.image_size == 64
    assert pos.shape == (8 * 8 + 1, 128) and tpos.shape == (32, 128)
    st = torch.load(final / "train_state.pt", weights_only=True)  # no unsafe pickle
    assert (st["step"], st["stage_name"], st["stage_step"], st["world_size"]) == (12, "finetune", 4, 1)
    assert json.loads(st["config"])["stages"][1]["image_size"] == 64
    assert json.loads((final / "meta.json").read_text())["model"] == "ViT-Tiny-8-CL32-GAP"
    # the fine-tune started from the pre-trained weights (4 small steps away), not from scratch
    with safe_open(str(ck / "step_00000008" / "model.safetensors"), "pt") as f:
        pre = f.get_tensor("visual.conv1.weight")
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        ft = f.get_tensor("visual.conv1.weight")
    assert (ft - pre).abs().max() < 4 * 2e-4 * 1.01


@pytest.mark.slow
def test_resume_auto_is_one_command_to_rerun_after_every_stop(demo_small, uninterrupted, tmp_path):
    """The same command with --resume auto: on an empty --out it trains from scratch; stopped at step 5
    (as a preemption would stop it) and re-run, it continues from there and ends bit-identical to the
    uninterrupted run; re-run once the run is done, it has nothing left to do."""
    out = tmp_path / "run"
    args = _tiny_demo_args(demo_small, out, "--resume", "auto")
    first = _train([*args, "--max-steps", "5"])
    assert "resuming from" not in first and "from scratch" in first
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    second = _train(args)
    assert f"resuming from {out / 'checkpoints' / 'step_00000005'} (step 5," in second
    want, _ = _losses(uninterrupted)
    got, _ = _losses(out)
    assert sorted(want) == list(range(1, 13)) and got == want
    final = "checkpoints/step_00000012/model.safetensors"
    assert same_weights(uninterrupted / final, out / final)
    third = _train(args)
    assert "nothing to run: the selected stages finished by step 12" in third
    assert _losses(out)[0] == want


@pytest.mark.slow
def test_finetune_py_from_a_pretrain_checkpoint(demo_small, uninterrupted, tmp_path):
    """finetune.py loads a 32 px / 16-token pre-train checkpoint into the 64 px / 32-token model
    (position tables resized, learnable) and trains; an incompatible architecture is a one-line error."""
    pre = uninterrupted / "checkpoints" / "step_00000008"
    out = tmp_path / "ft"
    stdout = _train(
        [
            "--cfg",
            "demo",
            "--pretrained",
            str(pre),
            "--workers",
            "1",
            "--batch-size",
            "16",
            "--train-num-samples",
            "48",
            "--train-data",
            demo_small.train_wds,
            "--log-every",
            "1",
            "--out",
            str(out),
        ],
        script="finetune.py",
    )
    assert f"from {pre}" in stdout and "stage finetune done at step 3" in stdout
    losses, _ = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    p = _run(
        [
            PY,
            "finetune.py",
            "--cfg",
            "demo",
            "--pretrained",
            str(pre),
            "--train-data",
            demo_small.train_wds,
            "--set",
            "finetune.model=ViT-Test-8-CL16",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "does not fit" in p.stderr


@pytest.mark.slow
def test_demo_preset_loss_falls(demo_small, tmp_path):
    """train.py --cfg demo (its pre-train stage, shortened from the CLI) learns on the demo data;
    --save-minutes 0 saves at every time check (each 10 steps), --keep 2 prunes the older ones."""
    out = tmp_path / "demo"
    _train(
        [
            "--cfg",
            "demo",
            "--stage",
            "pretrain",
            "--train-num-samples",
            str(32 * 50),
            "--workers",
            "1",
            "--train-data",
            demo_small.train_wds,
            "--log-every",
            "1",
            "--out",
            str(out),
            "--save-minutes",
            "0",
            "--keep",
            "2",
        ]
    )
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000040", "step_00000050"]
    losses, _ = _losses(out)
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (48, 49, 50)]
    assert sum(last) / 3 < sum(first) / 3 - 0.4, losses
    assert sum(last) / 3 < math.log(32) - 0.2, losses  # well below chance for a batch of 32


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_train_py_on_xla_matches_cpu(demo_small, uninterrupted, tmp_path, devices):
    """train.py --device xla on PJRT's CPU client, 1 device and SPMD over 2 devices (the TPU path:
    one process, batch sharded on a 'data' mesh): the eager CPU run's losses on the same data, a
    compile count that stops growing after the first steps, a checkpoint the CPU can load."""
    out = tmp_path / "xla"
    args = _tiny_demo_args(demo_small, out, "--stage", "pretrain", "--device", "xla", "--max-steps", "6")
    stdout = _train(args, CPU_NUM_DEVICES=devices)
    first = stdout.splitlines()[0]
    assert first.startswith(
        "device: xla (CPU, PJRT, " + ("1 device)" if devices == 1 else "SPMD data parallel over 2 devices, 1 host")
    )
    want, _ = _losses(uninterrupted)
    got, recs = _losses(out)
    assert [got[s] for s in range(1, 7)] == pytest.approx([want[s] for s in range(1, 7)], abs=1e-4)
    compiles = [r["compiles"] for r in recs if "compiles" in r]
    assert len(compiles) == 6 and compiles[2:] == [compiles[2]] * 4 and compiles[-1] <= 3, compiles
    st = torch.load(out / "checkpoints" / "step_00000006" / "train_state.pt", weights_only=True)
    assert st["stage_step"] == 6 and st["optimizer"]["state"][0]["step"].device.type == "cpu"


def _accum_step(k, mask=None, seed=0):
    """Updated weights and loss after one SGD(lr=1) step with --accum-steps k (update = gradient)."""
    rt = xla_utils.init_runtime("cpu")
    torch.manual_seed(seed)
    m = factory.create_model("ViT-Test-8-CL16", mask=mask or "none", mask_ratio=0.5 if mask else 0.0).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    tokens = torch.randint(1, 49000, (8, 16), generator=g)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    torch.manual_seed(7)  # the image masks' stream
    loss = train.Step(rt, m, opt, losses.ContrastiveLoss("softmax", rt), accum_steps=k)(images, tokens, 1.0)
    return loss.item(), {n: p.detach().clone() for n, p in m.named_parameters()}, (m, images, tokens)


def test_exact_accumulation_gives_the_full_batch_gradient():
    """--accum-steps K: K chunks of the batch, the gradient and loss of the FULL batch's contrastive
    loss (every chunk's rows see every other chunk's as negatives), K = 1, 2, 4."""
    want_loss, want, _ = _accum_step(1)
    for k in (2, 4):
        loss, got, _ = _accum_step(k)
        assert loss == pytest.approx(want_loss, abs=1e-6), k
        for n in want:
            # fp32 sums in another order: weights of up to ~6 differ by ~2 ulp (float64: 7e-15)
            assert torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-5), (k, n)
    rt = xla_utils.init_runtime("cpu")
    _, _, (m, images, tokens) = _accum_step(1)
    with pytest.raises(ValueError, match="not divisible by --accum-steps 3"):
        sgd = torch.optim.SGD(m.parameters(), lr=1.0)
        train.Step(rt, m, sgd, losses.ContrastiveLoss("softmax", rt), accum_steps=3)(images, tokens, 1.0)


def test_accumulation_replays_the_image_masks():
    """With random image masking, both passes of a chunk draw the same masks: the update equals the
    gradient of the full-batch loss of the masked chunks drawn in order (computed by hand)."""
    loss, got, _ = _accum_step(2, mask="random")
    rt = xla_utils.init_runtime("cpu")
    torch.manual_seed(0)
    m = factory.create_model("ViT-Test-8-CL16", mask="random", mask_ratio=0.5).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    tokens = torch.randint(1, 49000, (8, 16), generator=g)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.manual_seed(7)
    step = train.Step(rt, m, None, losses.ContrastiveLoss("softmax", rt))
    feats = [step.features(images[i : i + 4], tokens[i : i + 4]) for i in (0, 4)]
    image = torch.cat([f.image for f in feats])
    text = torch.cat([f.text for f in feats])
    ref = losses.clip_loss(image, text, feats[1].scale, rt)
    ref.backward()
    assert loss == pytest.approx(ref.item(), abs=1e-6)
    for n, p in m.named_parameters():
        assert torch.allclose(before[n] - got[n], p.grad, atol=1e-5, rtol=0), n


@pytest.mark.slow
def test_accumulation_memory_falls_with_k(tmp_path):
    """Peak host memory of a step at batch 1024 falls with K (activations of one chunk at a time)."""
    script = tmp_path / "mem.py"
    script.write_text(
        "import resource, sys, torch, factory, losses, model, train, xla_utils\n"
        "rt = xla_utils.init_runtime('cpu'); k = int(sys.argv[1])\n"
        "m = factory.create_model('ViT-Tiny-8-CL16-Syntax-GAP', image_size=32).train()\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "x = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8); t = torch.randint(1, 49000, (1024, 16))\n"
        "kb = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')   # reset the peak (VmHWM) to the current RSS\n"
        "base = kb('VmRSS')\n"
        "train.Step(rt, m, opt, losses.ContrastiveLoss('softmax', rt), accum_steps=k)(x, t, 0.1)\n"
        "print(kb('VmHWM') - base)\n"
    )
    peak = {k: int(_run([PY, str(script), str(k)]).stdout.split()[-1]) for k in (1, 8)}
    assert peak[8] < 0.6 * peak[1], peak


# ----------------------------------------------------------------------------- inputs checked up front


def test_eval_inputs_are_checked_before_the_first_step(demo_small, tmp_path, capsys):
    """A templates file without '{}' or class names that do not match the eval set stop the run in
    one line before anything trains (no checkpoint, no metrics); 'short' / 'openai' are accepted."""
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a thing\n")
    names = os.path.join(demo_small.root, "classnames.txt")
    base = ["--cfg", "demo", "--train-data", demo_small.train_wds, "--eval-data", demo_small.val_dir]
    for extra, needle in [
        (["--eval-classnames", names, "--eval-templates", str(bad)], "placeholder"),
        ([], "36 classes but 1000 class names"),
        (["--eval-classnames", names, "--resume", "latest"], "--resume latest: no checkpoint in"),
    ]:
        out = tmp_path / "run"
        assert train.main(base + extra + ["--out", str(out)]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
        assert not out.exists()
    run, stages, _ = config.parse_args(base + ["--eval-classnames", names, "--eval-templates", "short"])
    inputs = train.check_inputs(run, stages)
    assert len(inputs.eval.templates) == 7 and len(inputs.eval.classnames) == 36


def _tree(root) -> dict:
    """Every path under root with its size and modification time: what "changes nothing" compares."""
    return {
        os.path.relpath(os.path.join(d, n), root): os.lstat(os.path.join(d, n))[6:9]
        for d, dirs, files in os.walk(root)
        for n in dirs + files
    }


def test_a_run_into_an_out_with_checkpoints_needs_resume(demo_small, tmp_path, capsys):
    """train.py and finetune.py without --resume into an --out that holds checkpoints (with or without
    the `latest` pointer): one line naming --resume auto, exit 2, and the directory untouched (no lock
    file, no metrics, no temporaries removed)."""
    out = tmp_path / "run"
    ck = out / "checkpoints"
    (ck / "step_00000003").mkdir(parents=True)
    (ck / "step_00000003" / "model.safetensors").write_bytes(b"weights")
    (ck / ".step_00000006.tmp123").mkdir()  # a kill mid-save: only a run that continues removes it
    base = ["--cfg", "demo", "--train-data", demo_small.train_wds, "--out", str(out)]
    for pointer in (True, False):
        if pointer:
            (ck / "latest").write_text("step_00000003\n")
        else:
            (ck / "latest").unlink()
        before = _tree(out)
        for argv, finetune in [(base, False), (base + ["--pretrained", str(ck / "step_00000003")], True)]:
            status = train.main(argv, prog="finetune.py" if finetune else "train.py", finetune=finetune)
            err = capsys.readouterr().err
            assert status == 2 and err.count("\n") == 1, err
            assert err.startswith(f"error: --out {out} already holds checkpoints: pass --resume auto"), err
            assert _tree(out) == before


def test_finetune_with_resume_auto_on_an_empty_out_checks_pretrained(demo_small, tmp_path, capsys):
    """finetune.py --resume auto on an empty --out is a fresh start from --pretrained: weights that do
    not load are refused before the first step, as without --resume."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    out = tmp_path / "run"
    argv = ["--cfg", "demo", "--train-data", demo_small.train_wds, "--pretrained", str(junk), "--out", str(out)]
    assert train.main([*argv, "--resume", "auto"], prog="finetune.py", finetune=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(junk) in err, err
    assert not out.exists()


def test_out_on_an_object_store_is_refused_not_made_local(demo_small, tmp_path, monkeypatch, capsys):
    """--out on a read-only scheme (http://, pipe:; s3:// and gs:// are written: tests/test_remote_checkpoints.py),
    a URL with a slash missing, or a scheme nothing reads: one line, exit 2, and no local directory named
    `gs:` (or anything else)."""
    monkeypatch.chdir(tmp_path)
    base = ["--cfg", "demo", "--train-data", demo_small.train_wds, "--resume", "auto"]
    for out, needle in [
        ("http://127.0.0.1:1/run", "--out http://127.0.0.1:1/run: http: is read only; write to a local path, s3://"),
        ("pipe:cat run", "--out pipe:cat run: pipe: is read only"),
        ("gs:/bucket/run", "did you mean gs://"),
        ("ftp://host/run", "unsupported storage scheme ftp://"),
    ]:
        assert train.main(base + ["--out", out]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert os.listdir(tmp_path) == []
    # file:// is the local file system: the run's paths are the paths it names
    run, stages, _ = config.parse_args(base + ["--out", f"file://{tmp_path}/run"])
    assert train.check_inputs(run, stages).resume_path is None and run.out == f"{tmp_path}/run"


def test_training_eval_uses_the_trainers_runtime_and_precision(monkeypatch):
    """run_eval hands eval_zeroshot the trainer's Runtime (ranks, SPMD mesh) and its precision."""
    seen = {}

    def fake_evaluate(net, cfg, path, **kw):
        seen.update(kw)
        return {"top1": 0.5, "top5": 1.0, "n": 2}

    monkeypatch.setattr(eval_zeroshot, "evaluate", fake_evaluate)
    rt = xla_utils.init_runtime("cpu")
    stage = config.PRESETS["demo"].stages[0]
    m = factory.create_model(stage.model)
    sr = train.StageRun(0, stage, m, m, None, None, None)
    log = train.RunLog(xla_utils.CpuRuntime(torch.device("cpu"), rank=1), "/nonexistent")  # quiet
    ev = train.EvalSet("dir", ["a", "b"], ["{}"])
    train.run_eval(rt, log, sr, ev, 5, "bf16", config.RunConfig(cfg="demo"))
    assert seen["runtime"] is rt and seen["precision"] == "bf16"


def test_an_internal_error_keeps_its_traceback(demo_small, tmp_path, monkeypatch):
    """Only input errors become one line: a bug inside the run propagates with its traceback."""

    def broken(*a, **k):
        raise ValueError("a bug deep in the run")

    monkeypatch.setattr(train.Step, "__call__", broken)
    with pytest.raises(ValueError, match="a bug deep in the run"):
        train.main(
            [
                "--cfg",
                "demo",
                "--stage",
                "pretrain",
                "--train-data",
                demo_small.train_wds,
                "--workers",
                "0",
                "--out",
                str(tmp_path / "run"),
            ]
        )


@pytest.mark.slow
def test_agree_is_one_decision_for_every_process(tmp_path):
    """A time-based save is a collective: two processes whose clocks disagree must both save."""
    script = tmp_path / "agree.py"
    script.write_text(
        "import sys, xla_utils\nrt = xla_utils.init_runtime('cpu')\n"
        "open(f'{sys.argv[-1]}.{rt.rank}', 'w').write(repr("
        "(rt.agree(rt.rank == 1), rt.agree(False), rt.agree_each([rt.rank == 0, False, True]))))\n"
        "rt.barrier()\nrt.shutdown()\n"
    )
    p = _run(
        [
            PY,
            "xla_utils.py",
            "launch",
            "--nproc",
            "2",
            "--master-port",
            str(free_port()),
            str(script),
            str(tmp_path / "r"),
        ]
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for rank in (0, 1):
        assert (tmp_path / f"r.{rank}").read_text() == "(True, False, [True, False, True])"


# ----------------------------------------------------------------------------- the compiled step


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, mask, ckpt", [("ViT-Test-8-CL16", "none", False), ("ViT-Test-8-CL32-GAP-BigVision", "random", True)]
)
def test_compiled_step_has_no_graph_break_and_compiles_once(name, mask, ckpt):
    """--compile: the forward + loss (+ its backward) is one graph, compiled on the first step and
    never again over the stage (the lr changes every step); with no masking it trains exactly as
    the eager step does (masks are drawn by the compiled graph's own RNG, so masked runs differ)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    rt = xla_utils.init_runtime("cpu")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    tokens = torch.randint(1, 30000, (8, 16 if "CL16" in name else 32), generator=g)
    stage = config.Stage("s", model=name, image_size=32, batch_size=8, lr=1e-3, warmup=2, train_num_samples=80)

    def run(compiled):
        torch.manual_seed(0)
        m = factory.create_model(name, image_size=32, mask=mask, mask_ratio=0.5 if mask != "none" else 0.0)
        m.set_grad_checkpointing(ckpt)
        opt = train.build_optimizer(m.train(), stage, rt)
        loss = losses.ContrastiveLoss(m.cfg.loss, rt)
        step = train.Step(rt, m, opt, loss, compiled=compiled)
        out, graphs = [], []
        for i in range(4):
            out.append(step(images, tokens, train.lr_at(i, stage)).item())
            graphs.append(counters["stats"]["unique_graphs"])
        return out, graphs

    torch._dynamo.reset()
    counters.clear()
    compiled, graphs = run(True)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert graphs == [graphs[0]] * 4 and graphs[0] >= 1, graphs
    eager, _ = run(False)
    if mask == "none":
        assert compiled == pytest.approx(eager, abs=1e-5)


@pytest.mark.slow
def test_compiled_train_py_resumes_bit_exact(demo_small, tmp_path):
    """--compile keeps train.py's promise: a run stopped at step 5 and resumed (a new process,
    compiling again) repeats the uninterrupted compiled run bit for bit, through the stage change
    into the masked fine-tune (masks drawn inside the compiled graph): the same losses and weights."""
    full, part = tmp_path / "full", tmp_path / "part"
    _train(_tiny_demo_args(demo_small, full, "--compile"))
    _train(_tiny_demo_args(demo_small, part, "--compile", "--max-steps", "5"))
    stdout = _train(_tiny_demo_args(demo_small, part, "--compile", "--resume", "latest"))
    assert "resuming from" in stdout and stdout.count("compiled the step in") == 2  # once per stage
    want, _ = _losses(full)
    got, _ = _losses(part)
    assert sorted(want) == list(range(1, 13)) and got == want
    final = "checkpoints/step_00000012/model.safetensors"
    assert same_weights(full / final, part / final)


@pytest.mark.slow
def test_two_compiled_processes_match_one(step_script, cpu_baseline, tmp_path):
    """--compile under DDP (2 gloo processes, gather-with-grad through functional collectives):
    the same losses and first-step gradients as one eager process within 1e-5 (the weights are not
    compared: AdamW turns the float noise of near-zero gradients into +-lr steps)."""
    one, _ = cpu_baseline
    out = tmp_path / "compiled2.pt"
    p = _run(
        [
            PY,
            "xla_utils.py",
            "launch",
            "--nproc",
            "2",
            "--master-port",
            str(free_port()),
            str(step_script),
            str(out),
            "4",
            "--compile",
        ]
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert two["rec"]["losses"] == pytest.approx(one["rec"]["losses"], abs=1e-5)
    for k, g in one["rec"]["grads"].items():
        assert torch.allclose(two["rec"]["grads"][k], g, atol=1e-5, rtol=0), k


@pytest.mark.slow
def test_training_time_retrieval_eval(demo_small, tmp_path):
    """--eval-retrieval: image<->text recall at the end of the stage, in the log and metrics.jsonl."""
    out = tmp_path / "run"
    stdout = _train(
        _tiny_demo_args(
            demo_small,
            out,
            "--stage",
            "pretrain",
            "--set",
            "pretrain.train_num_samples=32",
            "--eval-retrieval",
            demo_small.val_captions,
        )
    )
    assert "retrieval R@1: image->text" in stdout and "(72 images, 72 captions)" in stdout
    _, recs = _losses(out)
    ev = [r for r in recs if "eval_retrieval_image_to_text_R@1" in r]
    assert len(ev) == 1 and 0 <= ev[0]["eval_retrieval_text_to_image_R@10"] <= 1
    assert (
        train.main(
            ["--cfg", "demo", "--train-data", demo_small.train_wds, "--eval-retrieval", str(tmp_path / "nothing")]
        )
        == 2
    )


# ----------------------------------------------------------------------------- frequency masking


def test_frequency_reduction_needs_a_good_counts_file(tmp_path, capsys):
    """--text-reduction frequency without --word-counts, or with a missing, corrupt or other tokenizer's
    file, or a threshold out of (0, 1], is refused in one line (exit 2) before anything is built."""
    counts = tokenizer.WordCounts("clip_bpe", total=100, captions=10, counts={"a": 20, "dog": 5})
    tokenizer.write_word_counts(str(tmp_path / "ok.json"), counts)
    tokenizer.write_word_counts(str(tmp_path / "wp.json"), dataclasses.replace(counts, tokenizer="wordpiece"))
    (tmp_path / "bad.json").write_text("{ not json")
    base = ["--cfg", "demo", "--stage", "pretrain", "--text-reduction", "frequency", "--dry-run"]
    for extra, match in (
        ([], "needs word counts: give --word-counts FILE"),
        (["--word-counts", str(tmp_path / "none.json")], "No such file"),
        (["--word-counts", str(tmp_path / "bad.json")], "not JSON"),
        (["--word-counts", str(tmp_path / "wp.json")], "count again with --tokenizer clip_bpe"),
        (["--word-counts", str(tmp_path / "ok.json"), "--frequency-threshold", "2"], "must be in (0, 1]"),
    ):
        assert train.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: stage pretrain: ") and match in err and err.count("\n") == 1, err
    assert train.main([*base, "--word-counts", str(tmp_path / "ok.json")]) == 0
    stage = json.loads(capsys.readouterr().out.splitlines()[1])
    assert (stage["text_reduction"], stage["word_counts"], stage["frequency_threshold"]) == (
        "frequency",
        str(tmp_path / "ok.json"),
        1e-6,
    )


@pytest.mark.slow
def test_frequency_masking_trains_resumes_exactly_and_exports(demo_small, tmp_path, capsys):
    """Word counts of the demo shards, then 8 pre-train steps with frequency masking: stopped at step 5
    and resumed, the run ends bit-identical to an uninterrupted one; the run records the counts file's
    sha256, a resume with other counts is refused in one line, and the checkpoint exports."""
    counts = str(tmp_path / "counts.json")
    assert data.main(["counts", demo_small.train_wds, "--out", counts]) == 0
    sha = json.loads(capsys.readouterr().out)["sha256"]

    def args(out, *extra):
        return _tiny_demo_args(
            demo_small, out, "--stage", "pretrain", "--text-reduction", "frequency", "--word-counts", counts, *extra
        )

    full, part = tmp_path / "full", tmp_path / "part"
    stdout = _train(args(full))
    assert f"frequency masking t=1e-06: {counts} ({sha})" in stdout
    _train(args(part, "--max-steps", "5"))
    _train(args(part, "--resume", "auto"))
    want, recs = _losses(full)
    assert sorted(want) == list(range(1, 9)) and _losses(part)[0] == want
    assert [r["word_counts_sha256"] for r in recs if "word_counts_sha256" in r] == [sha]
    final = "checkpoints/step_00000008/model.safetensors"
    assert same_weights(full / final, part / final)
    state = torch.load(str(part / "checkpoints" / "step_00000008" / "train_state.pt"), weights_only=True)
    assert json.loads(state["config"])["word_counts_sha256"] == {"pretrain": sha}
    # other counts under the same name: refused, unless --force-resume
    assert data.main(["counts", demo_small.train_wds, "--out", counts, "--top", "5"]) == 0
    p = _run([PY, "train.py", *args(part, "--resume", "latest")])
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"pretrain.word_counts sha256 {sha[:12]} -> " in p.stderr and "--force-resume" in p.stderr
    capsys.readouterr()
    assert (
        export.main([str(part / "checkpoints" / "step_00000008"), "--to", "open_clip", str(tmp_path / "x") + "/"]) == 0
    )
    assert "frequency" in (tmp_path / "x" / "README.md").read_text()
