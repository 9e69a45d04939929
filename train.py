"""CLIPA training: presets, the contrastive step, checkpoints, resume, multi-stage schedules.

    torchrun --nproc_per_node 8 train.py --cfg l16_i37_t8 --train-data '/data/laion/{00000..41407}.tar'
    python xla_utils.py launch train.py --cfg h14_v2 --train-data ...        # TPU VM (SPMD)
    python train.py --cfg demo                                                  # CPU, embedded data
    python train.py --cfg b16_i50_t16 --dry-run --batch-size 4096               # print resolved stages

A preset is a list of stages (pre-train at few tokens, then fine-tune at full length). train.py runs
the selected stages in order, each one initialised from the previous stage's last checkpoint;
finetune.py runs the fine-tune stages from a given pre-trained checkpoint with the same functions.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import xla_utils

# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Stage:
    """One training phase. Numbers from CLIPA_SPEC section 4; lr = base_lr x batch_size / 256."""
    name: str
    model: str
    image_size: int
    context_length: int | None = None     # None: the model's own (T8/T16/T32 are in the names)
    text_reduction: str | None = None     # None: the model's (syntax for -Syntax- names)
    pos_embed: str = "sincos"             # "sincos" (fixed 2-D) | "learnable" (v1 fine-tunes)
    mask: str = "none"                    # image token masking: none | random | grid | block
    mask_ratio: float = 0.0
    batch_size: int = 256                 # global batch (all devices, all accumulation steps)
    base_lr: float = 8e-6
    lr: float | None = None               # None: base_lr * batch_size / 256
    warmup: int = 0                       # linear warmup steps
    train_num_samples: int = 0            # samples seen in this stage: steps = samples // batch
    weight_decay: float = 0.2
    color_jitter: bool = False
    scale_min: float = 0.4                # RandomResizedCrop scale=(scale_min, 1.0)
    train_data: str = ""                  # shard spec (wds/TFRecord/TFDS) or "demo"
    train_format: str | None = None       # None: detect from the files
    init: str = "scratch"                 # "scratch" | "previous" (the previous stage / --pretrained)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    @property
    def steps(self) -> int:
        return self.train_num_samples // self.batch_size


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    stages: tuple[Stage, ...]
    reported: str = ""                    # the paper's result for this recipe (README table)


def _v1(name, pre_model, img, batch, warmup, ft_model, ft_batch, ft_warmup, jitter, desc, reported):
    return Preset(name, desc, (
        Stage("pretrain", pre_model, img, batch_size=batch, base_lr=8e-6, warmup=warmup,
              train_num_samples=2_560_000_000, color_jitter=jitter),
        Stage("finetune", ft_model, 224, pos_embed="learnable", batch_size=ft_batch, base_lr=8e-7,
              warmup=ft_warmup, train_num_samples=131_072_000, color_jitter=jitter, init="previous"),
    ), reported)


def _v2(name, pre_model, ft_model, desc, reported, pre_ctx=None):
    # one progressive schedule: 12.8B samples at 84 px / 8 tokens, then 512M at 224 px (30% random
    # masking), then 128M at 336 px (40%); position embeddings stay sin-cos (reference configs)
    return Preset(name, desc, (
        Stage("pretrain", pre_model, 84, context_length=pre_ctx,
              text_reduction="syntax" if pre_ctx else None, batch_size=65536, base_lr=8e-6,
              warmup=782, train_num_samples=12_811_670_000, color_jitter=True),
        Stage("ft224", ft_model, 224, mask="random", mask_ratio=0.3, batch_size=32768, base_lr=4e-7,
              warmup=800, train_num_samples=524_288_000, color_jitter=True, init="previous"),
        Stage("ft336", ft_model, 336, mask="random", mask_ratio=0.4, batch_size=16384, base_lr=1e-7,
              warmup=1600, train_num_samples=131_072_000, color_jitter=True, init="previous"),
    ), reported)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _v1("b16_i50_t16", "ViT-B-16-CL16", 112, 65536, 782, "ViT-B-16-CL16", 8192, 3072, False,
        "v1 B/16: pre-train 112 px (I50) / 16 tokens, fine-tune 224 px",
        "63.2% IN-1K zero-shot, ~2 days on 8xA100 (LAION-400M)"),
    _v1("l16_i17_t16", "ViT-L-16-CL16-Syntax-GAP", 64, 32768, 1563, "ViT-L-16-CL16-GAP", 7168, 3571,
        True, "v1 L/16: pre-train 64 px (I17) / 16 syntax tokens, fine-tune 224 px",
        "67.8% IN-1K zero-shot, ~3 days on 8xA100 (LAION-400M)"),
    _v1("l16_i37_t8", "ViT-L-16-CL8-Syntax-GAP", 96, 32768, 1563, "ViT-L-16-CL32-GAP", 7168, 3571,
        True, "v1 L/16: pre-train 96 px (I37) / 8 syntax tokens, fine-tune 224 px / 32 tokens",
        "69.3% IN-1K zero-shot, ~4 days on 8xA100 (LAION-400M)"),
    Preset("h14_i36_t8", "v1-code H/14: pre-train 84 px (I36) / 8 syntax tokens, fine-tune 224 px "
           "with 30% random masking (the reference's TPU scripts)", (
        Stage("pretrain", "ViT-H-14-CL8-Syntax-GAP", 84, batch_size=65536, base_lr=8e-6, warmup=782,
              train_num_samples=2_560_000_000, color_jitter=True),
        Stage("finetune", "ViT-H-14-CL32-GAP", 224, mask="random", mask_ratio=0.3, batch_size=32768,
              base_lr=4e-7, warmup=800, train_num_samples=524_288_000, color_jitter=True,
              init="previous"),
    ), "not reported in v1 (the v2 schedule below is the H/14 result)"),
    _v2("h14_v2", "ViT-H-14-CL8-Syntax-GAP", "ViT-H-14-CL32-GAP",
        "v2 H/14: 84 px / 8 tokens -> 224 px 30% mask -> 336 px 40% mask",
        "79.1% IN-1K zero-shot, 8640 A100-hours (LAION-2B); 81.8% on DataComp-1B"),
    _v2("l14_v2", "ViT-L-14-CL32-GAP-BigVision", "ViT-L-14-CL32-GAP-BigVision",
        "v2 L/14 (BigVision towers): 84 px / 8 tokens -> 224 px 30% mask -> 336 px 40% mask",
        "79.7% after 224 px (4008 A100-hours), 80.3% after 336 px (4520 h), DataComp-1B", pre_ctx=8),
    Preset("demo", "tiny CPU demo on the embedded procedural data: 32 px / 16 syntax tokens, then "
           "64 px / 32 tokens with 30% random masking and learnable position embeddings", (
        # a long warmup matters: at 2e-3 with 10 warmup steps the tiny model sits at chance
        Stage("pretrain", "ViT-Tiny-8-CL16-Syntax-GAP", 32, batch_size=32, base_lr=1.6e-2, warmup=25,
              train_num_samples=32 * 300, scale_min=0.6, train_data="demo"),
        Stage("finetune", "ViT-Tiny-8-CL32-GAP", 64, pos_embed="learnable", mask="random",
              mask_ratio=0.3, batch_size=32, base_lr=1.6e-3, warmup=10, train_num_samples=32 * 100,
              scale_min=0.6, train_data="demo", init="previous"),
    ), "a smoke test, not a result"),
]}

CHOICES = {"pos_embed": ("sincos", "learnable"), "mask": ("none", "random", "grid", "block"),
           "text_reduction": (None, "truncate", "random", "block", "syntax"),
           "init": ("scratch", "previous"), "train_format": (None, "wds", "tfrecord", "tfds")}
STAGE_FIELDS = [f.name for f in dataclasses.fields(Stage) if f.name != "name"]


def _parse_field(name: str, text: str):
    """Parse a command-line string for Stage field `name` by the field's declared type."""
    ftype = {f.name: f.type for f in dataclasses.fields(Stage)}[name]
    if "None" in ftype and text.lower() in ("none", "null", ""):
        return None
    try:
        if ftype.startswith("bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if ftype.startswith("int"):
            v = float(text.replace("_", ""))
            if v != int(v):
                raise ValueError
            return int(v)
        if ftype.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"bad value {text!r} for {name} (expects {ftype})") from None
    return text


def resolve_stages(cfg: str, overrides=(), select: str | None = None) -> list[tuple[int, Stage]]:
    """The preset's stages with overrides applied, as (index in the preset, Stage).

    overrides: (stage or None for all, field, text) triples; stage is a stage name or index.
    select: comma-separated stage names/indices to run (None: all)."""
    if cfg not in PRESETS:
        raise ValueError(f"unknown preset {cfg!r}; valid: {', '.join(PRESETS)}")
    stages = list(PRESETS[cfg].stages)
    names = [s.name for s in stages]

    def index_of(sel: str) -> int:
        if sel.isdigit() and int(sel) < len(stages):
            return int(sel)
        if sel in names:
            return names.index(sel)
        raise ValueError(f"unknown stage {sel!r} of preset {cfg}; valid: {', '.join(names)} "
                         f"(or 0..{len(stages) - 1})")

    for sel, fname, text in overrides:
        if fname not in STAGE_FIELDS:
            raise ValueError(f"unknown field {fname!r}; valid: {', '.join(STAGE_FIELDS)}")
        value = _parse_field(fname, text)
        targets = range(len(stages)) if sel is None else [index_of(sel)]
        for i in targets:
            stages[i] = replace(stages[i], **{fname: value})
    chosen = range(len(stages)) if not select else sorted({index_of(s.strip()) for s in select.split(",")})
    out = [(i, stages[i]) for i in chosen]
    for _, s in out:
        for fname, allowed in CHOICES.items():
            if getattr(s, fname) not in allowed:
                raise ValueError(f"stage {s.name}: {fname}={getattr(s, fname)!r}; valid: "
                                 f"{', '.join(str(a) for a in allowed)}")
        if not 0.0 <= s.mask_ratio < 1.0:
            raise ValueError(f"stage {s.name}: mask_ratio must be in [0, 1), got {s.mask_ratio}")
        if s.steps < 1:
            raise ValueError(f"stage {s.name}: train_num_samples {s.train_num_samples} < batch_size "
                             f"{s.batch_size} (no step to run)")
    return out


# ----------------------------------------------------------------------------- run options


@dataclass
class RunConfig:
    cfg: str = "demo"
    out: str = "runs/demo"
    device: str = "auto"
    precision: str = "auto"               # auto: bf16 autocast on CUDA, fp32 on XLA and CPU
    seed: int = 0
    workers: int = 2
    log_every: int = 10
    save_every: int = 1000                # steps
    save_minutes: float = 60.0            # also save when this much time passed since the last save
    keep: int = 3                         # checkpoints kept (older ones deleted)
    resume: str | None = None             # "latest" or a checkpoint directory
    pretrained: str | None = None         # weights for the first selected stage
    eval_every: int = 0                   # steps; 0: only at the end of each stage if eval_data
    eval_data: str | None = None          # ImageFolder / TFDS dir for zero-shot eval ("demo")
    eval_batch_size: int = 64
    eval_classnames: str | None = None    # file, one class name per line (default: ImageNet-1K)
    eval_templates: str | None = None     # file, one prompt template per line (default: OpenAI 80)
    grad_checkpointing: bool = False
    accum_steps: int = 1
    max_steps: int | None = None          # stop after this global step (resumable)
    stage: str | None = None


# ----------------------------------------------------------------------------- the step


def clip_loss(image_features, text_features, logit_scale, rt: xla_utils.Runtime):
    """Local loss with gather-with-grad: this rank's rows against the features of the global batch,
    labels offset by the rank; the mean of the image->text and text->image cross-entropies."""
    all_image, offset = rt.all_gather_with_grad(image_features)
    all_text, _ = rt.all_gather_with_grad(text_features)
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on ndim<2 params, biases, norms, logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = (p.ndim < 2 or name.endswith("bias") or "norm" in name or "ln_" in name
                  or "logit_scale" in name)
        (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model, stage: Stage, rt: xla_utils.Runtime) -> torch.optim.AdamW:
    # XLA: capturable keeps the step count and bias corrections on the device (no per-step host
    # scalars that would change the graph). CUDA: fused kernel. CPU: foreach (2x the for-loop).
    kw = {"xla": dict(capturable=True), "cuda": dict(fused=True), "cpu": dict(foreach=True)}[rt.kind]
    return torch.optim.AdamW(param_groups(model, stage.weight_decay), lr=stage.resolved_lr,
                             betas=(0.9, 0.95), eps=1e-6, **kw)


def lr_at(step: int, stage: Stage) -> float:
    """Linear warmup to the peak, then cosine to zero, per step (step counts from 0). Never exactly 0
    (0 and 1 are special constants to XLA: a new graph)."""
    peak, warmup, total = stage.resolved_lr, stage.warmup, stage.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * peak


def unwrap(model):
    return getattr(model, "module", model)


def train_step(rt: xla_utils.Runtime, model, optimizer, images, tokens, lr: float, *,
               precision: str = "fp32", accum_steps: int = 1):
    """One optimizer step on this rank's batch (uint8 images [B,3,H,W] on the host, tokens [B,T]).
    Returns the loss (a device tensor, mean over the accumulation chunks). The caller marks the
    step boundary (rt.step_boundary) after it."""
    import data
    raw = unwrap(model)
    for g in optimizer.param_groups:
        g["lr"] = lr
    n = images.shape[0]
    if n % accum_steps:
        raise ValueError(f"per-rank batch {n} is not divisible by --accum-steps {accum_steps}")
    chunk = n // accum_steps
    total = 0.0
    for i in range(accum_steps):
        imgs, toks = rt.to_device(images[i * chunk:(i + 1) * chunk], tokens[i * chunk:(i + 1) * chunk])
        x = data.normalize(imgs, raw.cfg.image_mean, raw.cfg.image_std)
        # DDP: all-reduce gradients only on the last chunk
        sync = nullcontext() if i == accum_steps - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with rt.autocast(precision):
                img_f, txt_f, scale = model(x, toks)
                loss = clip_loss(img_f.float(), txt_f.float(), scale.float(), rt)
            (loss / accum_steps).backward()
        total = total + loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        raw.logit_scale.clamp_(0, math.log(100))
    return total / accum_steps


# ----------------------------------------------------------------------------- data


class Batches:
    """Endless (images uint8, tokens) batches of one stage for this rank: data.py's loader repeats
    epochs itself; state() / the state argument resume without repeating or skipping data."""

    def __init__(self, spec, tokenizer, stage: Stage, per_rank_batch: int, rt, run: RunConfig,
                 stage_index: int, state: dict | None = None):
        import data
        self.loader = data.make_train_loader(
            spec, tokenizer, stage.image_size, per_rank_batch, fmt=stage.train_format,
            num_workers=run.workers, seed=run.seed + stage_index, rank=rt.rank,
            world_size=rt.world_size, scale=(stage.scale_min, 1.0), color_jitter=stage.color_jitter,
            state=state)
        self.it = iter(self.loader)

    def __next__(self):
        return next(self.it)

    def state(self) -> dict:
        return self.loader.state_dict()


def demo_data(out: str, rt: xla_utils.Runtime):
    """The embedded demo dataset under OUT/demo_data (written once by the master; idempotent)."""
    import data
    root = os.path.join(out, "demo_data")
    if rt.is_master:
        data.make_demo_dataset(root)
    rt.barrier()
    return data.make_demo_dataset(root)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_root(out: str) -> str:
    return os.path.join(out, "checkpoints")


def find_checkpoint(spec: str, out: str) -> str:
    """'latest' -> the directory named in OUT/checkpoints/latest; else a checkpoint directory."""
    if spec == "latest":
        latest = os.path.join(checkpoint_root(out), "latest")
        if not os.path.exists(latest):
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_root(out)}")
        with open(latest) as f:
            spec = os.path.join(checkpoint_root(out), f.read().strip())
    if not os.path.exists(os.path.join(spec, "train_state.pt")):
        raise FileNotFoundError(f"not a training checkpoint directory (no train_state.pt): {spec}")
    return spec


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(rt, run: RunConfig, model, optimizer, state: dict, stage: Stage) -> str | None:
    """OUT/checkpoints/step_XXXXXXXX/{model.safetensors, train_state.pt, meta.json}, written
    atomically by the master; then OUT/checkpoints/latest names it; older ones beyond --keep go."""
    import model as model_lib
    from safetensors.torch import save_file
    raw = unwrap(model)
    # every rank's loader and RNG state (collective: all ranks call this)
    per_rank = rt.all_gather_object({"rng": rt.rng_state(), "data": state.pop("data")})
    if not rt.is_master:
        rt.barrier()
        return None
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in raw.state_dict().items()}
    train_state = dict(state, optimizer=_to_cpu(optimizer.state_dict()),
                       rng=[r["rng"] for r in per_rank], data=[r["data"] for r in per_rank],
                       world_size=rt.world_size)
    meta = {k: v for k, v in state.items() if k != "config"}
    meta.update(model=stage.model, time=datetime.datetime.now(datetime.timezone.utc).isoformat())
    name = f"step_{state['step']:08d}"
    root = checkpoint_root(run.out)

    def fill(d):
        save_file(weights, os.path.join(d, "model.safetensors"),
                  metadata=model_lib.weights_metadata(stage.model, raw.cfg))
        torch.save(train_state, os.path.join(d, "train_state.pt"))
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    path = xla_utils.atomic_dir(os.path.join(root, name), fill)
    xla_utils.atomic_write_text(name + "\n", os.path.join(root, "latest"))
    old = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d))[:-run.keep]
    keep_always = state.get("stage_ends", [])
    for d in old:
        if d not in keep_always:   # the last checkpoint of each finished stage is kept
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    rt.barrier()
    return path


def load_train_state(path: str) -> dict:
    return torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)


def load_weights_exact(model, path: str):
    """Resume: our own weights file, every key must match (no conversion, no resizing)."""
    from safetensors.torch import load_file
    sd = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the stage's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------- logging


class Logger:
    """Progress lines on stdout (master), OUT/metrics.jsonl, TensorBoard when installed."""

    def __init__(self, rt, out: str):
        self.rt, self.file, self.tb = rt, None, None
        if rt.is_master:
            os.makedirs(out, exist_ok=True)
            self.file = open(os.path.join(out, "metrics.jsonl"), "a")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def info(self, msg: str):
        if self.rt.is_master:
            print(msg, flush=True)

    def record(self, rec: dict):
        if not self.rt.is_master:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


# ----------------------------------------------------------------------------- the loop


def run_training(run: RunConfig, stages: list[tuple[int, Stage]]) -> dict:
    """Run the selected stages; resumes from run.resume; returns a summary dict."""
    rt = xla_utils.init_runtime(run.device)
    log = Logger(rt, run.out)
    precision = run.precision if run.precision != "auto" else ("bf16" if rt.kind == "cuda" else "fp32")
    log.info(f"{rt.describe()}; precision {precision}; preset {run.cfg}; out {run.out}")
    for _, s in stages:   # fail early on shapes that cannot split evenly
        if s.batch_size % (rt.world_size * run.accum_steps):
            raise ValueError(f"stage {s.name}: batch size {s.batch_size} is not divisible by "
                             f"{rt.world_size} ranks x {run.accum_steps} accumulation steps")
        if rt.spmd and (s.batch_size // rt.world_size // run.accum_steps) % (rt.num_devices // rt.world_size):
            raise ValueError(f"stage {s.name}: per-host batch must be divisible by the local device count")

    resume_state, resume_path = None, None
    if run.resume:
        resume_path = find_checkpoint(run.resume, run.out)
        resume_state = load_train_state(resume_path)
        preset_stages = PRESETS[run.cfg].stages
        idx = resume_state["stage_index"]
        if idx >= len(preset_stages) or preset_stages[idx].name != resume_state["stage_name"]:
            raise ValueError(f"{resume_path} is stage {resume_state['stage_name']!r} of another preset, "
                             f"not of {run.cfg} (stages: {', '.join(s.name for s in preset_stages)})")
        log.info(f"resuming from {resume_path} (step {resume_state['step']}, stage "
                 f"{resume_state['stage_name']}, stage step {resume_state['stage_step']})")

    step = resume_state["step"] if resume_state else 0
    stage_ends = list(resume_state.get("stage_ends", [])) if resume_state else []
    prev_ckpt = run.pretrained
    summary = {"stages": [], "device": rt.kind}
    stage_list = [s for _, s in stages]
    config_json = json.dumps({"run": dataclasses.asdict(run),
                              "stages": [dataclasses.asdict(s) for s in stage_list]})
    try:
        for pos, (si, stage) in enumerate(stages):
            stage_state = None
            if resume_state is not None:
                done_index = resume_state["stage_index"]
                if si < done_index:
                    continue                      # finished before the checkpoint
                if si == done_index:
                    if resume_state["stage_step"] >= stage.steps:
                        prev_ckpt = resume_path   # stage finished: the next starts from its weights
                        continue
                    stage_state = resume_state
                else:   # the checkpoint's stage is not among the selected ones
                    prev_ckpt = prev_ckpt or resume_path
            if run.max_steps is not None and step >= run.max_steps:
                break
            init = None
            if stage_state is None and stage.init == "previous":
                if not prev_ckpt:
                    raise ValueError(f"stage {stage.name} fine-tunes a pre-trained model: give "
                                     f"--pretrained CKPT (or run the stage before it)")
                init = prev_ckpt
            elif stage_state is None and pos == 0 and run.pretrained:
                init = run.pretrained
            result = run_stage(rt, run, log, si, stage, step, init=init, state=stage_state,
                               resume_path=resume_path if stage_state else None,
                               precision=precision, config_json=config_json, stage_ends=stage_ends)
            step = result["step"]
            summary["stages"].append(result)
            if result["finished"]:
                prev_ckpt = result["checkpoint"]
            else:
                break
        if not summary["stages"]:
            log.info(f"nothing to run: the selected stages finished by step {step}")
    finally:
        log.close()
    summary["step"] = step
    rt.barrier()
    rt.shutdown()
    return summary


def run_stage(rt, run: RunConfig, log: Logger, si: int, stage: Stage, step: int, *, init, state,
              resume_path, precision: str, config_json: str, stage_ends: list) -> dict:
    import model as model_lib
    import tokenizer as tokenizer_lib

    # data first: a missing dataset should fail before minutes of model building
    spec, eval_data = stage.train_data, run.eval_data
    classnames = _read_lines(run.eval_classnames) if run.eval_classnames else None
    templates = _read_lines(run.eval_templates) if run.eval_templates else None
    if stage.train_data == "demo" or run.eval_data == "demo":
        demo = demo_data(run.out, rt)
        if stage.train_data == "demo":
            spec = demo.train_wds
        if run.eval_data == "demo":
            eval_data, classnames, templates = demo.val_dir, demo.classnames, demo.templates
    if not spec:
        raise ValueError(f"stage {stage.name} of preset {run.cfg}: no training data; give --train-data "
                         f"SPEC (webdataset tars, TFRecords or a TFDS dir)")

    # same seed for a stage whether the run got here directly or by resuming at the boundary
    rt.seed(run.seed + 1000 * si + rt.rank)
    model = model_lib.create_model(stage.model, image_size=stage.image_size,
                                   context_length=stage.context_length, pos_embed=stage.pos_embed,
                                   mask=stage.mask, mask_ratio=stage.mask_ratio, pretrained=init)
    if state is not None:
        load_weights_exact(model, resume_path)
    if run.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(rt.device).train()
    optimizer = build_optimizer(model, stage, rt)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        r = state["rng"][rt.rank] if len(state["rng"]) == rt.world_size else state["rng"][0]
        rt.set_rng_state(r)
    wmodel = rt.wrap_model(model)

    tok = tokenizer_lib.get_tokenizer(stage.model, context_length=stage.context_length,
                                      reduction=stage.text_reduction)
    per_rank = stage.batch_size // rt.world_size
    # all ranks' loader states: data.py takes this rank's, or resumes at shard granularity when
    # the world size changed
    batches = Batches(spec, tok, stage, per_rank, rt, run, si, state=state["data"] if state else None)

    stage_step = state["stage_step"] if state else 0
    samples = state["samples"] if state else 0
    log.info(f"stage {stage.name} ({si}): {stage.model} {stage.image_size}px ctx "
             f"{model.cfg.text.context_length} pos {stage.pos_embed} mask {stage.mask}:{stage.mask_ratio}"
             f" | batch {stage.batch_size} lr {stage.resolved_lr:.3g} warmup {stage.warmup} "
             f"steps {stage.steps} | from {'step ' + str(stage_step) if state else init or 'scratch'}")

    t_start = time.time()
    last_save = time.time()
    saved_at = stage_step if state is not None else -1   # stage step of the newest checkpoint
    clock = {"t": t_start, "step": stage_step}

    def report(loss, scale, lr, gstep, sstep, nsamples):
        # runs once the step's values exist on the host (XLA: after the graph ran)
        now = time.time()
        dt, dsteps = now - clock["t"], sstep - clock["step"]
        clock.update(t=now, step=sstep)
        # host values only: a device op here would be one more XLA graph
        loss_v = rt.mean_over_ranks(loss.item())
        scale_v = math.exp(scale.item())
        sps = dsteps * stage.batch_size / dt if dt > 0 else 0.0
        eta = (stage.steps - sstep) * dt / max(1, dsteps)
        compiles = rt.compile_count()
        rec = {"step": gstep, "stage": stage.name, "stage_step": sstep, "loss": loss_v, "lr": lr,
               "logit_scale": scale_v, "samples_per_s": sps, "samples": nsamples,
               "time": now}
        if compiles is not None:
            rec["compiles"] = compiles
        log.record(rec)
        log.info(f"step {gstep} [{stage.name} {sstep}/{stage.steps}] {sps:.1f} samples/s | loss "
                 f"{loss_v:.4f} | lr {lr:.3e} | logit scale {scale_v:.2f} | ETA {_eta(eta)}"
                 + (f" | compiles {compiles}" if compiles is not None else ""))

    def checkpoint():
        st = {"step": step, "stage_index": si, "stage_name": stage.name, "stage_step": stage_step,
              "samples": samples, "config": config_json, "data": batches.state(),
              "stage_ends": list(stage_ends)}
        return save_checkpoint(rt, run, wmodel, optimizer, st, stage)

    finished = True
    while stage_step < stage.steps:
        if run.max_steps is not None and step >= run.max_steps:
            finished = False
            break
        images, tokens = next(batches)
        lr = lr_at(stage_step, stage)
        loss = train_step(rt, wmodel, optimizer, images, tokens, lr, precision=precision,
                          accum_steps=run.accum_steps)
        step, stage_step, samples = step + 1, stage_step + 1, samples + stage.batch_size
        if stage_step % run.log_every == 0 or stage_step == stage.steps or stage_step == 1:
            rt.add_step_closure(report, (loss, model.logit_scale.detach(), lr, step, stage_step, samples))
        rt.step_boundary()
        if run.eval_every and stage_step % run.eval_every == 0 and eval_data:
            run_eval(rt, run, log, model, eval_data, classnames, templates, step, stage)
        due = stage_step % run.save_every == 0
        if not due and stage_step % 10 == 0:     # time-based saves (all ranks must agree)
            due = rt.any_rank(time.time() - last_save > run.save_minutes * 60)
        if due and stage_step < stage.steps:
            checkpoint()
            saved_at, last_save = stage_step, time.time()

    if finished:
        stage_ends.append(f"step_{step:08d}")   # kept by --keep pruning: the next stage's init
    if saved_at != stage_step:
        checkpoint()
    ckpt = os.path.join(checkpoint_root(run.out), f"step_{step:08d}")
    metrics = None
    if finished and eval_data:
        metrics = run_eval(rt, run, log, model, eval_data, classnames, templates, step, stage)
    elapsed = time.time() - t_start
    log.info(f"stage {stage.name} {'done' if finished else 'stopped'} at step {step} "
             f"({elapsed:.1f}s); checkpoint {ckpt}")
    return {"name": stage.name, "step": step, "stage_step": stage_step, "finished": finished,
            "checkpoint": ckpt, "seconds": elapsed, "eval": metrics, "compiles": rt.compile_count()}


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def run_eval(rt, run, log, model, data_path, classnames, templates, step, stage) -> dict:
    import eval_zeroshot
    model.eval()
    try:
        res = eval_zeroshot.evaluate(model, model.cfg, data_path, classnames=classnames,
                                     templates=templates, batch_size=run.eval_batch_size,
                                     num_workers=run.workers, device=rt.device, model_name=stage.model,
                                     rank=rt.rank if rt.distributed else 0,
                                     world_size=rt.world_size if rt.distributed else 1)
    finally:
        model.train()
    log.record({"step": step, "stage": stage.name, **{f"eval_{k}": v for k, v in res.items()}})
    log.info(f"step {step} zero-shot: top1 {res['top1']:.4f} top5 {res['top5']:.4f} (n={res['n']})")
    return res


# ----------------------------------------------------------------------------- CLI

# flag -> Stage field (each applies to every selected stage; --set STAGE.FIELD=V targets one)
STAGE_FLAGS = {
    "--model": "model", "--image-size": "image_size", "--context-length": "context_length",
    "--text-reduction": "text_reduction", "--pos-embed": "pos_embed", "--mask": "mask",
    "--mask-ratio": "mask_ratio", "--batch-size": "batch_size", "--lr": "lr", "--base-lr": "base_lr",
    "--warmup": "warmup", "--train-num-samples": "train_num_samples", "--weight-decay": "weight_decay",
    "--color-jitter": "color_jitter", "--scale-min": "scale_min", "--train-data": "train_data",
    "--train-format": "train_format",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line and exit 2, not argparse's usage block
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(prog: str, finetune: bool = False) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0] if not finetune else
                                "CLIPA fine-tuning: the preset's fine-tune stage(s) from a pre-trained "
                                "checkpoint.")
    p.add_argument("--cfg", required=True, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--stage", default=None, help="stages to run: names or indices, comma-separated")
    p.add_argument("--out", default=None, help="output directory (default runs/CFG)")
    p.add_argument("--device", default="auto", choices=xla_utils.DEVICES)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loader workers per process")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps")
    p.add_argument("--save-minutes", type=float, default=60.0, help="... and every M minutes")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--pretrained", default=None, required=finetune,
                   help="weights for the first stage (a checkpoint dir, .safetensors or OpenCLIP file)")
    p.add_argument("--eval-every", type=int, default=0, help="zero-shot eval every N steps")
    p.add_argument("--eval-data", default=None, help="ImageFolder/TFDS dir for zero-shot eval, or 'demo'")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-classnames", default=None, help="class names file (default ImageNet-1K)")
    p.add_argument("--eval-templates", default=None, help="prompt templates file (default OpenAI 80)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop (resumably) after this global step")
    p.add_argument("--dry-run", action="store_true", help="print the resolved stages and exit")
    for flag, fname in STAGE_FLAGS.items():
        p.add_argument(flag, dest=f"stage__{fname}", default=None, metavar="V",
                       help=f"stage field {fname} for every selected stage")
    p.add_argument("--set", action="append", default=[], metavar="[STAGE.]FIELD=VALUE",
                   help="override any stage field, e.g. --set finetune.batch_size=4096")
    return p


def parse_args(argv, prog="train.py", finetune=False):
    """argv -> (RunConfig, [(index, Stage)], dry_run). Raises ValueError on bad presets/fields."""
    a = build_parser(prog, finetune).parse_args(argv)
    overrides = []
    for fname in STAGE_FIELDS:
        v = getattr(a, f"stage__{fname}", None)
        if v is not None:
            overrides.append((None, fname, v))
    for item in a.set:
        if "=" not in item:
            raise ValueError(f"--set expects [STAGE.]FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        sel, _, fname = key.rpartition(".")
        overrides.append((sel or None, fname, value))
    if a.cfg not in PRESETS:
        raise ValueError(f"unknown preset {a.cfg!r}; valid: {', '.join(PRESETS)}")
    select = a.stage
    if finetune and select is None:   # finetune.py: the stages that start from a previous one
        select = ",".join(s.name for s in PRESETS[a.cfg].stages if s.init == "previous")
    stages = resolve_stages(a.cfg, overrides, select)
    for flag, n in (("--accum-steps", a.accum_steps), ("--log-every", a.log_every),
                    ("--save-every", a.save_every), ("--keep", a.keep)):
        if n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    run = RunConfig(cfg=a.cfg, out=a.out or os.path.join("runs", a.cfg), device=a.device,
                    precision=a.precision, seed=a.seed, workers=a.workers, log_every=a.log_every,
                    save_every=a.save_every, save_minutes=a.save_minutes, keep=a.keep, resume=a.resume,
                    pretrained=a.pretrained, eval_every=a.eval_every, eval_data=a.eval_data,
                    eval_batch_size=a.eval_batch_size, eval_classnames=a.eval_classnames,
                    eval_templates=a.eval_templates, grad_checkpointing=a.grad_checkpointing,
                    accum_steps=a.accum_steps, max_steps=a.max_steps, stage=select)
    if run.pretrained and not os.path.exists(run.pretrained):
        raise FileNotFoundError(f"--pretrained: no such file or directory: {run.pretrained}")
    return run, stages, a.dry_run


def describe_stages(run: RunConfig, stages) -> str:
    lines = [f"preset {run.cfg}: {PRESETS[run.cfg].description}"]
    for i, s in stages:
        d = dataclasses.asdict(s)
        d.update(index=i, lr=s.resolved_lr, steps=s.steps)
        lines.append(json.dumps(d))
    return "\n".join(lines)


def main(argv=None, prog="train.py", finetune=False) -> int:
    try:
        run, stages, dry = parse_args(sys.argv[1:] if argv is None else argv, prog, finetune)
        if dry:
            print(describe_stages(run, stages))
            return 0
        run_training(run, stages)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
