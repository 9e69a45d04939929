"""CLIPA training: presets, the contrastive step, checkpoints, resume, multi-stage schedules.

    torchrun --nproc_per_node 8 train.py --cfg l16_i37_t8 --train-data '/data/laion/{00000..41407}.tar'
    python xla_utils.py launch train.py --cfg h14_v2 --train-data ...        # TPU VM (SPMD)
    python train.py --cfg b16_i50_t16 --dry-run --batch-size 4096               # print resolved stages
    python train.py --cfg l16_i37_t8 --flops                                    # FLOPs per stage

A preset is a list of stages (pre-train at few tokens, then fine-tune at full length). train.py runs
the selected stages in order, each one initialised from the previous stage's last checkpoint;
finetune.py runs the fine-tune stages from a given pre-trained checkpoint with the same functions.
Every option is declared once, as a field of `Stage` (per stage) or `RunConfig` (per run); the
command line is generated from those fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field, replace

import torch

import checkpoints
import cli
import data
import eval_zeroshot
import losses
import model as model_lib
import plan
import tokenizer as tokenizer_lib
import xla_utils


def opt(default, help: str, **meta):
    """A dataclass field with its command-line help (and choices) beside its default."""
    return field(default=default, metadata=dict(help=help, **meta))


# ----------------------------------------------------------------------------- presets

INITS = ("scratch", "previous")


@dataclass(frozen=True)
class Stage:
    """One training phase. Numbers from docs/recipe.md; lr = base_lr x batch_size / 256."""

    name: str
    model: str = opt("", "registry name of the model (model.py)")
    image_size: int = opt(224, "training resolution: CLIPA's image token reduction by resizing")
    context_length: int | None = opt(None, "text tokens (None: the model's own, T8/T16/T32 in its name)")
    text_reduction: str | None = opt(
        None, "text token reduction (None: the model's)", choices=(None, *tokenizer_lib.REDUCTIONS)
    )
    pos_embed: str = opt("sincos", "image position embedding", choices=model_lib.POS_EMBEDS)
    mask: str = opt("none", "image token masking", choices=model_lib.MASK_STRATEGIES)
    mask_ratio: float = opt(0.0, "fraction of image patches masked")
    batch_size: int = opt(256, "global batch (all devices, all accumulation steps)")
    base_lr: float = opt(8e-6, "lr per 256 samples")
    lr: float | None = opt(None, "peak lr (None: base_lr x batch_size / 256)")
    warmup: int = opt(0, "linear warmup steps")
    train_num_samples: int = opt(0, "samples seen in this stage: steps = samples // batch")
    weight_decay: float = opt(0.2, "AdamW weight decay (weight matrices only)")
    color_jitter: bool = opt(False, "colour jitter augmentation")
    scale_min: float = opt(0.4, "RandomResizedCrop scale=(scale_min, 1)")
    train_data: str = opt("", "training shards: webdataset tars, TFRecords or a TFDS dir")
    train_format: str | None = opt(None, "shard format (None: detected from the bytes)", choices=(None, *data.FORMATS))
    init: str = opt("scratch", "start from scratch or the previous stage / --pretrained", choices=INITS)
    loss: str = opt("softmax", "contrastive loss: softmax (CLIP) or sigmoid (SigLIP)", choices=losses.LOSSES)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    @property
    def steps(self) -> int:
        return self.train_num_samples // self.batch_size

    def model_config(self) -> model_lib.CLIPConfig:
        return replace(
            model_lib.get_model_config(
                self.model,
                image_size=self.image_size,
                context_length=self.context_length,
                pos_embed=self.pos_embed,
                mask=self.mask,
                mask_ratio=self.mask_ratio,
            ),
            loss=self.loss,
        )


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    stages: tuple[Stage, ...]
    reported: str = ""  # the paper's result for this recipe (README table)


# The papers' stage templates; each preset below names only what differs.
V1_PRETRAIN = Stage("pretrain", base_lr=8e-6, train_num_samples=2_560_000_000)
V1_FINETUNE = Stage(
    "finetune", image_size=224, pos_embed="learnable", base_lr=8e-7, train_num_samples=131_072_000, init="previous"
)
# v2: one progressive schedule, 12.8B samples at 84 px / 8 tokens, then 512M at 224 px (30% random
# masking), then 128M at 336 px (40%); position embeddings stay sin-cos (reference configs)
V2_PRETRAIN = Stage(
    "pretrain",
    image_size=84,
    batch_size=65536,
    base_lr=8e-6,
    warmup=782,
    train_num_samples=12_811_670_000,
    color_jitter=True,
)
V2_FT224 = Stage(
    "ft224",
    image_size=224,
    mask="random",
    mask_ratio=0.3,
    batch_size=32768,
    base_lr=4e-7,
    warmup=800,
    train_num_samples=524_288_000,
    color_jitter=True,
    init="previous",
)
V2_FT336 = Stage(
    "ft336",
    image_size=336,
    mask="random",
    mask_ratio=0.4,
    batch_size=16384,
    base_lr=1e-7,
    warmup=1600,
    train_num_samples=131_072_000,
    color_jitter=True,
    init="previous",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="b16_i50_t16",
            description="v1 B/16: pre-train 112 px (I50) / 16 tokens, fine-tune 224 px",
            reported="63.2% IN-1K zero-shot, ~2 days on 8xA100 (LAION-400M)",
            stages=(
                replace(V1_PRETRAIN, model="ViT-B-16-CL16", image_size=112, batch_size=65536, warmup=782),
                replace(V1_FINETUNE, model="ViT-B-16-CL16", batch_size=8192, warmup=3072),
            ),
        ),
        Preset(
            name="l16_i17_t16",
            description="v1 L/16: pre-train 64 px (I17) / 16 syntax tokens, fine-tune 224 px",
            reported="67.8% IN-1K zero-shot, ~3 days on 8xA100 (LAION-400M)",
            stages=(
                replace(
                    V1_PRETRAIN,
                    model="ViT-L-16-CL16-Syntax-GAP",
                    image_size=64,
                    batch_size=32768,
                    warmup=1563,
                    color_jitter=True,
                ),
                replace(V1_FINETUNE, model="ViT-L-16-CL16-GAP", batch_size=7168, warmup=3571, color_jitter=True),
            ),
        ),
        Preset(
            name="l16_i37_t8",
            description="v1 L/16: pre-train 96 px (I37) / 8 syntax tokens, fine-tune 224 px / 32 tokens",
            reported="69.3% IN-1K zero-shot, ~4 days on 8xA100 (LAION-400M)",
            stages=(
                replace(
                    V1_PRETRAIN,
                    model="ViT-L-16-CL8-Syntax-GAP",
                    image_size=96,
                    batch_size=32768,
                    warmup=1563,
                    color_jitter=True,
                ),
                replace(V1_FINETUNE, model="ViT-L-16-CL32-GAP", batch_size=7168, warmup=3571, color_jitter=True),
            ),
        ),
        Preset(
            name="h14_i36_t8",
            description="v1-code H/14: pre-train 84 px (I36) / 8 syntax tokens, fine-tune "
            "224 px with 30% random masking (the reference's TPU scripts)",
            reported="not reported in v1 (the v2 schedule below is the H/14 result)",
            stages=(
                replace(
                    V1_PRETRAIN,
                    model="ViT-H-14-CL8-Syntax-GAP",
                    image_size=84,
                    batch_size=65536,
                    warmup=782,
                    color_jitter=True,
                ),
                replace(V2_FT224, name="finetune", model="ViT-H-14-CL32-GAP"),
            ),
        ),
        Preset(
            name="h14_v2",
            description="v2 H/14: 84 px / 8 tokens -> 224 px 30% mask -> 336 px 40% mask",
            reported="79.1% IN-1K zero-shot, 8640 A100-hours (LAION-2B); 81.8% on DataComp-1B",
            stages=(
                replace(V2_PRETRAIN, model="ViT-H-14-CL8-Syntax-GAP"),
                replace(V2_FT224, model="ViT-H-14-CL32-GAP"),
                replace(V2_FT336, model="ViT-H-14-CL32-GAP"),
            ),
        ),
        Preset(
            name="l14_v2",
            description="v2 L/14 (BigVision towers): 84 px / 8 tokens -> 224 px 30% mask -> 336 px 40% mask",
            reported="79.7% after 224 px (4008 A100-hours), 80.3% after 336 px (4520 h), DataComp-1B",
            stages=(
                replace(V2_PRETRAIN, model="ViT-L-14-CL32-GAP-BigVision", context_length=8, text_reduction="syntax"),
                replace(V2_FT224, model="ViT-L-14-CL32-GAP-BigVision"),
                replace(V2_FT336, model="ViT-L-14-CL32-GAP-BigVision"),
            ),
        ),
        # a long warmup matters: at 2e-3 with 10 warmup steps the tiny model sits at chance
        Preset(
            name="demo",
            description="tiny CPU demo on the procedural data of launch/demo_data.py: 32 px / "
            "16 syntax tokens, then 64 px / 32 tokens with 30% random masking and learnable position "
            "embeddings",
            reported="a smoke test, not a result",
            stages=(
                Stage(
                    "pretrain",
                    model="ViT-Tiny-8-CL16-Syntax-GAP",
                    image_size=32,
                    batch_size=32,
                    base_lr=1.6e-2,
                    warmup=25,
                    train_num_samples=32 * 300,
                    scale_min=0.6,
                ),
                Stage(
                    "finetune",
                    model="ViT-Tiny-8-CL32-GAP",
                    image_size=64,
                    pos_embed="learnable",
                    mask="random",
                    mask_ratio=0.3,
                    batch_size=32,
                    base_lr=1.6e-3,
                    warmup=10,
                    train_num_samples=32 * 100,
                    scale_min=0.6,
                    init="previous",
                ),
            ),
        ),
    ]
}

STAGE_FIELDS = {f.name: f for f in dataclasses.fields(Stage) if f.name != "name"}


def _parse_value(name: str, ftype: str, text: str):
    """A command-line string -> the value of a field declared with type `ftype`."""
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


def check_stage(s: Stage) -> None:
    """Reject a stage that cannot run, with a one-line reason (before anything is built)."""
    for f in STAGE_FIELDS.values():
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(s, f.name) not in allowed:
            raise ValueError(
                f"stage {s.name}: {f.name}={getattr(s, f.name)!r}; valid: {', '.join(str(a) for a in allowed)}"
            )
    for name in ("image_size", "batch_size", "train_num_samples"):
        if getattr(s, name) < 1:
            raise ValueError(f"stage {s.name}: {name} must be >= 1, got {getattr(s, name)}")
    if s.context_length is not None and s.context_length < 1:
        raise ValueError(f"stage {s.name}: context_length must be >= 1, got {s.context_length}")
    if s.warmup < 0 or s.weight_decay < 0 or s.resolved_lr <= 0:
        raise ValueError(
            f"stage {s.name}: warmup and weight_decay must be >= 0 and lr > 0 (got warmup "
            f"{s.warmup}, weight_decay {s.weight_decay}, lr {s.resolved_lr})"
        )
    if not 0.0 < s.scale_min <= 1.0:
        raise ValueError(f"stage {s.name}: scale_min must be in (0, 1], got {s.scale_min}")
    if s.steps < 1:
        raise ValueError(
            f"stage {s.name}: train_num_samples {s.train_num_samples} < batch_size {s.batch_size} (no step to run)"
        )
    try:
        model_lib.check_config(s.model_config())  # unknown model, bad size for the patch, mask ratio
    except ValueError as e:
        raise ValueError(f"stage {s.name}: {e}") from None


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
        raise ValueError(f"unknown stage {sel!r} of preset {cfg}; valid: {', '.join(names)} (or 0..{len(stages) - 1})")

    for sel, fname, text in overrides:
        if fname not in STAGE_FIELDS:
            raise ValueError(f"unknown field {fname!r}; valid: {', '.join(STAGE_FIELDS)}")
        value = _parse_value(fname, STAGE_FIELDS[fname].type, text)
        for i in range(len(stages)) if sel is None else [index_of(sel)]:
            stages[i] = replace(stages[i], **{fname: value})
    chosen = range(len(stages)) if not select else sorted({index_of(s.strip()) for s in select.split(",")})
    out = [(i, stages[i]) for i in chosen]
    for _, s in out:
        check_stage(s)
    return out


def flops_table(stages: list[tuple[int, Stage]]) -> str:
    """Markdown table of a preset's stages: tokens, forward GFLOPs per sample (the papers'
    convention, 1 multiply-add = 1 FLOP) and the stage's training compute (3x forward x samples)."""
    rows = [
        "| stage | model | image px | patches kept | text tokens | GFLOPs/sample | samples | training EFLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, s in stages:
        cfg = s.model_config()
        f = model_lib.count_flops(cfg, mask_ratio=s.mask_ratio)
        samples = s.steps * s.batch_size
        rows.append(
            f"| {s.name} | {s.model} | {s.image_size} | {f['patches_kept']}/{f['patches']} | "
            f"{cfg.text.context_length} | {f['total_gflops']:.2f} | {samples:,} | "
            f"{3 * f['total_gflops'] * samples / 1e9:.1f} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------- run options

NONFINITE = ("stop", "skip")


@dataclass
class RunConfig:
    cfg: str = opt("", "preset: " + ", ".join(PRESETS), required=True)
    stage: str | None = opt(None, "stages to run: names or indices, comma-separated (default all)")
    out: str = opt("", "output directory (default runs/CFG)")
    device: str = opt("auto", "where to train", choices=xla_utils.DEVICES)
    precision: str = opt("auto", "auto: bf16 autocast on CUDA, fp32 on XLA and CPU", choices=xla_utils.PRECISIONS)
    seed: int = opt(0, "random seed")
    workers: int = opt(2, "data loader workers per process", min=0)
    log_every: int = opt(10, "progress line every N steps", min=1)
    save_every: int = opt(1000, "checkpoint every N steps", min=1)
    save_minutes: float = opt(60.0, "... and when this many minutes passed since the last save", min=0)
    keep: int = opt(3, "checkpoints kept (older ones are deleted; each stage's last stays)", min=1)
    resume: str | None = opt(None, "'latest' (in --out) or a checkpoint directory")
    pretrained: str | None = opt(None, "weights for the first stage: checkpoint dir, .safetensors or OpenCLIP file")
    eval_every: int = opt(0, "zero-shot eval every N steps (0: only at the end of each stage)", min=0)
    eval_data: str | None = opt(None, "ImageFolder / TFDS dir for zero-shot eval")
    eval_retrieval: str | None = opt(
        None,
        "captioned set for image-text retrieval eval (CLIP_benchmark "
        "wds / flickr30k / mscoco_captions root, or caption shards)",
    )
    eval_batch_size: int = opt(64, "zero-shot eval batch per process", min=1)
    eval_classnames: str | None = opt(None, "class names file (default: ImageNet-1K)")
    eval_templates: str | None = opt(None, "prompt templates: openai (80, default), short (7) or a file")
    grad_checkpointing: bool = opt(False, "recompute activations in the backward pass")
    accum_steps: int = opt(1, "gradient accumulation: the exact full-batch gradient in K chunks", min=1)
    shard: str = opt(
        "none",
        "none: replicate parameters and optimizer states; fsdp: shard them (FSDP2 / XLA SPMD)",
        choices=xla_utils.SHARDING,
    )
    compile: bool = opt(False, "torch.compile the step (CUDA / CPU; XLA compiles anyway): once per stage")
    max_steps: int | None = opt(None, "stop (resumably) after this global step", min=0)
    nonfinite: str = opt(
        "stop",
        "on a non-finite loss: stop (the last good checkpoint stays) or skip the step's update",
        choices=NONFINITE,
    )
    plan: bool = opt(False, "print each stage's per-device memory and a batch / accumulation / sharding plan")
    gpu_mem: float = opt(80.0, "--plan: memory per device in GB", min=1)
    devices: int = opt(8, "--plan: number of devices", min=1)
    force_resume: bool = opt(
        False,
        "resume although stage settings, seed, workers, accumulation or "
        "world size differ from the checkpoint's (the continuation is not exact)",
    )


# ----------------------------------------------------------------------------- the step


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only (biases, norms, class token, logit_scale: ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
    ]


def build_optimizer(model, stage: Stage, rt: xla_utils.Runtime) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, stage.weight_decay),
        lr=stage.resolved_lr,
        betas=(0.9, 0.95),
        eps=1e-6,
        **rt.optimizer_kwargs(),
    )


def lr_at(step: int, stage: Stage) -> float:
    """Linear warmup to the peak, then cosine to zero, per step (step counts from 0). Never exactly 0
    (0 and 1 are special constants to XLA: a new graph)."""
    peak, warmup, total = stage.resolved_lr, stage.warmup, stage.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * peak


def unwrap(model):  # the model inside a DDP wrapper
    return getattr(model, "module", model)


def features(model, images, tokens, rt: xla_utils.Runtime, precision: str):
    """uint8 images [B,3,H,W], tokens [B,T] on the device -> fp32 features, logit scale, bias."""
    raw = unwrap(model)
    x = data.normalize(images, raw.cfg.image_mean, raw.cfg.image_std)
    with rt.autocast(precision):
        img_f, txt_f, scale = model(x, tokens)
    return img_f.float(), txt_f.float(), scale.float(), raw.logit_bias


def loss_of(model, rt: xla_utils.Runtime):
    """The model's contrastive loss (losses.py): softmax, or sigmoid passed around the ring of ranks."""
    return losses.contrastive_loss(unwrap(model).cfg.loss, True, rt)


def batch_loss(model, images, tokens, rt: xla_utils.Runtime, precision: str):
    """Forward and contrastive loss of one batch: compiled as one graph with --compile."""
    img, txt, scale, bias = features(model, images, tokens, rt, precision)
    return loss_of(model, rt)(img, txt, scale, rt, bias)


@dataclass
class StepFns:
    """The step's compilable pieces: eager by default, torch.compile'd with --compile, then run in
    rt.deterministic() (compiled scatter-adds would make resumed runs differ)."""

    loss: object = batch_loss
    features: object = features
    context: object = contextlib.nullcontext

    @classmethod
    def compiled(cls, rt: xla_utils.Runtime) -> StepFns:
        return cls(rt.compile(batch_loss), rt.compile(features), rt.deterministic)


def train_step(
    rt: xla_utils.Runtime,
    model,
    optimizer,
    images,
    tokens,
    lr: float,
    *,
    precision: str = "fp32",
    accum_steps: int = 1,
    skip_nonfinite: bool = False,
    fns: StepFns | None = None,
):
    """One optimizer step on this rank's batch (uint8 images [B,3,H,W] on the host, tokens [B,T]);
    returns the global batch's loss (on the device); the caller marks rt.step_boundary after it.
    accum_steps K > 1: the exact full-batch gradient in K chunks (see accumulate). skip_nonfinite:
    drop the update when any rank's loss is not finite (a host read before the optimizer step)."""
    fns = fns or StepFns()
    for g in optimizer.param_groups:
        g["lr"] = lr
    if images.shape[0] % accum_steps:
        raise ValueError(f"per-rank batch {images.shape[0]} is not divisible by --accum-steps {accum_steps}")
    images, tokens = rt.to_device(images, tokens)
    with fns.context():  # the backward too: compiled lazily, on its first call
        if accum_steps == 1:
            loss = fns.loss(model, images, tokens, rt, precision)
            loss.backward()
        else:
            loss = accumulate(rt, model, images, tokens, accum_steps, precision, fns.features)
    if not (skip_nonfinite and rt.agree(not math.isfinite(loss.item()))):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, math.log(100))
    return loss.detach()


def accumulate(rt, model, images, tokens, k: int, precision: str, features_fn):
    """Gradient of the full-batch loss in k chunks (feature caching, as OpenCLIP's accumulation):
    a no-grad pass caches every chunk's features; then each chunk is recomputed with grad and the
    full-batch loss, with the other chunks' cached features, is backpropagated through it. The RNG is
    replayed so both passes draw the same image masks; the logit scale's own gradient is taken once
    (in the last pass, the one DDP synchronises, so every parameter has a gradient there)."""
    chunks = list(zip(images.chunk(k), tokens.chunk(k)))
    rng, cache = [], []
    with torch.no_grad():
        for x, t in chunks:
            rng.append(rt.rng_state())
            cache.append(features_fn(model, x, t, rt, precision)[:2])
    after = rt.rng_state()
    for j, (x, t) in enumerate(chunks):
        rt.set_rng_state(rng[j])
        last = j == k - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            img_j, txt_j, scale, bias = features_fn(model, x, t, rt, precision)
            img = torch.cat([img_j if i == j else c[0] for i, c in enumerate(cache)])
            txt = torch.cat([txt_j if i == j else c[1] for i, c in enumerate(cache)])
            if not last:  # the scale's (and bias's) own gradient: once
                scale, bias = scale.detach(), None if bias is None else bias.detach()
            loss = loss_of(model, rt)(img, txt, scale, rt, bias)
            loss.backward()
    rt.set_rng_state(after)
    return loss


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_root(out: str) -> str:
    return os.path.join(out, "checkpoints")


class RunStopped(Exception):
    """The run cannot go on (non-finite loss or weights, checkpoint not written): one line, exit 1."""


def save_checkpoint(rt, run: RunConfig, model, optimizer, state: dict, stage: Stage) -> str | None:
    """OUT/checkpoints/step_XXXXXXXX/{model.safetensors, train_state.pt, meta.json} (written by
    checkpoints.write_checkpoint: atomic, `latest` always complete, pruned to --keep). Collective:
    every rank calls it (each rank's loader and RNG state are gathered). Returns the path, or None
    when the write failed (disk full...): the previous checkpoint stays, the caller decides."""
    weights, optimizer_state = rt.full_state(model, optimizer)  # gathered from the shards under FSDP
    if rt.agree(not all(torch.isfinite(v).all() for v in weights.values())):
        raise RunStopped(
            f"the weights are not finite at step {state['step']}: not saving them; "
            f"the newest good checkpoint stays in {checkpoint_root(run.out)}"
        )
    per_rank = rt.all_gather_object({"rng": rt.rng_state(), "data": state.pop("data")})
    path = None
    try:
        if rt.is_master:
            train_state = dict(
                state,
                optimizer=optimizer_state,
                world_size=rt.world_size,
                rng=[r["rng"] for r in per_rank],
                data=[r["data"] for r in per_rank],
            )
            meta = {k: v for k, v in state.items() if k != "config"}
            meta.update(model=stage.model, time=datetime.datetime.now(datetime.UTC).isoformat())
            path = checkpoints.write_checkpoint(
                checkpoint_root(run.out),
                f"step_{state['step']:08d}",
                weights,
                model_lib.weights_metadata(stage.model, unwrap(model).cfg),
                train_state,
                meta,
                keep=run.keep,
                protected=state["stage_ends"],
            )
    except OSError as e:
        print(
            f"warning: checkpoint of step {state['step']} not written ({e}); the previous one stays",
            file=sys.stderr,
            flush=True,
        )
    finally:
        rt.barrier()
    return path if rt.is_master else ""


# what a bit-exact continuation depends on besides the stage's own fields
EXACT_RUN_FIELDS = ("seed", "workers", "accum_steps")


def load_resume_state(spec: str, run: RunConfig, stages) -> tuple[str, dict]:
    """--resume latest|DIR -> (checkpoint dir, its train state), checked against the preset and
    against the settings the checkpoint was trained with."""
    root = checkpoint_root(run.out)
    if spec == "latest" and not os.path.isfile(os.path.join(root, "latest")):
        raise FileNotFoundError(f"--resume latest: no checkpoint in {root}")
    path = checkpoints.resolve_checkpoint(root if spec == "latest" else spec)
    file = os.path.join(path, "train_state.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"not a training checkpoint directory (no train_state.pt): {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign file before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
        idx, name, saved = state["stage_index"], state["stage_name"], json.loads(state["config"])
        saved_cfg = saved["run"]["cfg"]
    except Exception as e:  # refused pickle, truncated zip, another structure: not our train state
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{file} is not a readable train state ({type(e).__name__}: {first})") from None
    preset = PRESETS[run.cfg].stages
    if saved_cfg != run.cfg or idx >= len(preset) or preset[idx].name != name:
        raise ValueError(
            f"{path} is stage {name!r} of preset {saved_cfg}, not of {run.cfg} "
            f"(stages: {', '.join(s.name for s in preset)})"
        )
    changed = [
        f"{k} {saved['run'].get(k)} -> {getattr(run, k)}"
        for k in EXACT_RUN_FIELDS
        if saved["run"].get(k) != getattr(run, k)
    ]
    if saved["run"].get("shard", "none") != run.shard:  # the optimizer state's layout differs
        raise ValueError(f"{path} was saved with --shard {saved['run'].get('shard', 'none')}: resume with it")
    now, then = dict(stages), {s["name"]: s for s in saved["stages"]}.get(name, {})
    if idx in now:
        changed += [
            f"{name}.{k} {then[k]} -> {v}"
            for k, v in dataclasses.asdict(now[idx]).items()
            if k in then and then[k] != v
        ]
    if changed and not run.force_resume:
        raise ValueError(
            f"{path} was trained with other settings ({'; '.join(changed)}): resuming would "
            f"not continue it exactly; pass --force-resume to continue anyway"
        )
    if idx in now:
        model_lib.check_weights_fit(path, now[idx].model_config())
    return path, state


# ----------------------------------------------------------------------------- logging


class RunLog:
    """What a run reports: lines on the master's stdout, records in OUT/metrics.jsonl (each with the
    invocation's run id, so steps re-run after a resume stay apart) and TensorBoard when installed.
    A failing disk never stops training through its logs: the failure is reported once."""

    def __init__(self, rt: xla_utils.Runtime, out: str):
        self.rt, self.file, self.tb, self._warned = rt, None, None, False
        self.run_id = os.urandom(4).hex()  # not from the seeded RNGs: those must stay untouched
        if rt.is_master:
            os.makedirs(out, exist_ok=True)
            self.file = open(os.path.join(out, "metrics.jsonl"), "a")  # noqa: SIM115 - open for the run
            with contextlib.suppress(Exception):  # tensorboard not installed: no TensorBoard logs
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out, "tensorboard"))

    def info(self, msg: str):
        if self.rt.is_master:
            print(msg, flush=True)

    def record(self, rec: dict):
        if not self.rt.is_master:
            return
        try:
            self.file.write(json.dumps({**rec, "run": self.run_id}) + "\n")
            self.file.flush()
            if self.tb is not None:
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self.tb.add_scalar(k, v, rec["step"])
        except OSError as e:
            if not self._warned:
                print(f"warning: metrics not written ({e}); training goes on", file=sys.stderr, flush=True)
                self._warned = True

    def close(self):
        for f in (self.file, self.tb):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


class Logger(RunLog):
    """RunLog (master's stdout, OUT/metrics.jsonl, TensorBoard) plus the progress record."""

    def __init__(self, rt, out: str):
        super().__init__(rt, out)
        self.start_stage(0)

    def start_stage(self, stage_step: int):
        self._t, self._step, self.data_wait = time.time(), stage_step, 0.0  # data_wait: s in next(batch)

    def step(self, stage: Stage, loss, scale, lr: float, step: int, stage_step: int, samples: int, skipped: int):
        """One progress record. A step closure: runs once the step's values exist on the host (XLA:
        after the graph ran); host values only (a device op here would be one more XLA graph)."""
        now = time.time()
        dt, dsteps, wait = now - self._t, stage_step - self._step, self.data_wait
        self.start_stage(stage_step)
        wait = wait / dt if dt > 0 else 0.0  # the interval's share spent waiting for a batch
        loss_v = self.rt.mean_over_ranks(loss.item())
        scale_v = math.exp(scale.item())
        sps = dsteps * stage.batch_size / dt if dt > 0 else 0.0
        eta = datetime.timedelta(seconds=int(max(0, (stage.steps - stage_step) * dt / max(1, dsteps))))
        compiles = self.rt.compile_count()
        self.record(
            {
                "step": step,
                "stage": stage.name,
                "stage_step": stage_step,
                "loss": loss_v,
                "lr": lr,
                "logit_scale": scale_v,
                "samples_per_s": sps,
                "samples": samples,
                "skipped_samples": skipped,
                "data_wait": wait,
                "time": now,
                **({"compiles": compiles} if compiles is not None else {}),
            }
        )
        self.info(
            f"step {step} [{stage.name} {stage_step}/{stage.steps}] {sps:.1f} samples/s | loss "
            f"{loss_v:.4f} | lr {lr:.3e} | logit scale {scale_v:.2f} | skipped {skipped} | data wait "
            f"{100 * wait:.0f}% | ETA {eta}" + (f" | compiles {compiles}" if compiles is not None else "")
        )


# ----------------------------------------------------------------------------- inputs


@dataclass
class EvalSet:
    data: str | None  # zero-shot classification set
    classnames: list[str]
    templates: list[str]
    retrieval: str | None = None  # captioned set for retrieval


@dataclass
class Inputs:
    """Everything a run reads besides its shards, checked before the first step."""

    resume_path: str | None = None
    resume_state: dict | None = None
    eval: EvalSet | None = None


def check_inputs(run: RunConfig, stages: list[tuple[int, Stage]]) -> Inputs:
    """Validate what the run will need (data, eval set, checkpoints) up front: a mistake costs a
    one-line error now, not a crash at the end of a stage. Raises ValueError / FileNotFoundError."""
    if run.pretrained and not os.path.exists(run.pretrained):
        raise FileNotFoundError(f"--pretrained: no such file or directory: {run.pretrained}")
    if os.path.exists(run.out) and not os.path.isdir(run.out):
        raise ValueError(f"--out {run.out} is a file, not a directory")
    for _, s in stages:
        if not s.train_data:
            raise ValueError(
                f"stage {s.name} of preset {run.cfg}: no training data; give --train-data "
                f"SPEC (webdataset tars, TFRecords or a TFDS dir)"
            )
        data.resolve(s.train_data, s.train_format)
    inputs = Inputs()
    if run.eval_data or run.eval_retrieval:
        inputs.eval = EvalSet(run.eval_data, [], [], run.eval_retrieval)
        if run.eval_retrieval:
            eval_zeroshot.load_caption_set(run.eval_retrieval)  # a readable captioned set
    if run.eval_data:
        if not os.path.exists(run.eval_data):
            raise FileNotFoundError(f"--eval-data: no such directory: {run.eval_data}")
        inputs.eval.classnames = eval_zeroshot.load_classnames(run.eval_classnames)
        eval_zeroshot.check_eval_set(run.eval_data, inputs.eval.classnames)
        inputs.eval.templates = eval_zeroshot.load_templates(run.eval_templates)
    if run.resume:
        inputs.resume_path, inputs.resume_state = load_resume_state(run.resume, run, stages)
    elif run.pretrained:  # the first stage starts from it: its weights must fit that model
        model_lib.create_model(stages[0][1].model_config(), pretrained=run.pretrained)
    return inputs


def check_layout(rt: xla_utils.Runtime, run: RunConfig, stages, inputs: Inputs) -> None:
    """Batches split evenly over ranks, accumulation steps and (XLA) devices; exact resume needs the
    saved rank count."""
    saved = inputs.resume_state["world_size"] if inputs.resume_state else rt.world_size
    if saved != rt.world_size and not run.force_resume:
        raise ValueError(
            f"{inputs.resume_path} was saved by {saved} ranks, this run has {rt.world_size}: "
            f"the data would resume at shard granularity; pass --force-resume to continue anyway"
        )
    for _, s in stages:
        if s.batch_size % (rt.world_size * run.accum_steps):
            raise ValueError(
                f"stage {s.name}: batch size {s.batch_size} is not divisible by "
                f"{rt.world_size} ranks x {run.accum_steps} accumulation steps"
            )
        if rt.spmd and (s.batch_size // rt.world_size // run.accum_steps) % (rt.num_devices // rt.world_size):
            raise ValueError(f"stage {s.name}: per-host batch must be divisible by the local device count")


# ----------------------------------------------------------------------------- the loop


@dataclass
class StageRun:
    """A stage, built and ready to step: where it starts and what it steps with."""

    index: int
    stage: Stage
    model: torch.nn.Module  # the CLIP itself
    wmodel: torch.nn.Module  # what the step calls (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    loader: data.TrainLoader
    batches: object  # iterator over the loader
    fns: StepFns = field(default_factory=StepFns)
    stage_step: int = 0
    samples: int = 0


def build_stage(
    rt, run: RunConfig, si: int, stage: Stage, *, init: str | None, state: dict | None, resume_path: str | None
) -> StageRun:
    """Model (from scratch, from `init`, or from the resumed checkpoint), optimizer, data."""
    rt.seed(run.seed + 1000 * si + rt.rank)  # the same whether started here or resumed at the boundary
    model = model_lib.create_model(stage.model_config(), pretrained=resume_path if state is not None else init)
    model.set_grad_checkpointing(run.grad_checkpointing)
    wmodel = rt.wrap_model(model.to(rt.device).train(), run.shard, rt.precision(run.precision))  # before AdamW
    optimizer = build_optimizer(model, stage, rt)
    tok = model_lib.get_tokenizer(stage.model, context_length=stage.context_length, reduction=stage.text_reduction)
    loader = data.make_train_loader(
        stage.train_data,
        tok,
        stage.image_size,
        stage.batch_size // rt.world_size,
        fmt=stage.train_format,
        num_workers=run.workers,
        seed=run.seed + si,
        rank=rt.rank,
        world_size=rt.world_size,
        scale=(stage.scale_min, 1.0),
        color_jitter=stage.color_jitter,
        pin_memory=rt.pin_memory,
        state=state["data"] if state else None,
    )
    sr = StageRun(
        si, stage, model, wmodel, optimizer, loader, iter(loader), StepFns.compiled(rt) if run.compile else StepFns()
    )
    if state is not None:
        rt.load_optimizer_state(wmodel, optimizer, state["optimizer"])
        rt.set_rng_state(state["rng"][rt.rank] if len(state["rng"]) == rt.world_size else state["rng"][0])
        sr.stage_step, sr.samples = state["stage_step"], state["samples"]
    return sr


def run_training(
    rt: xla_utils.Runtime,
    run: RunConfig,
    stages: list[tuple[int, Stage]],
    inputs: Inputs,
    signals: cli.StopSignals | None = None,
) -> dict:
    """Run the selected stages (resuming where inputs say); returns a summary dict."""
    signals = signals or cli.StopSignals()
    log = Logger(rt, run.out)
    precision = rt.precision(run.precision)
    log.info(f"{rt.describe()}; precision {precision}; preset {run.cfg}; out {run.out}")
    resume = inputs.resume_state
    if resume:
        log.info(
            f"resuming from {inputs.resume_path} (step {resume['step']}, stage "
            f"{resume['stage_name']}, stage step {resume['stage_step']})"
        )
    step = resume["step"] if resume else 0
    stage_ends = list(resume["stage_ends"]) if resume else []
    prev_ckpt = run.pretrained
    summary = {"stages": [], "device": rt.kind, "stopped_by": None}
    config_json = json.dumps({"run": dataclasses.asdict(run), "stages": [dataclasses.asdict(s) for _, s in stages]})
    try:
        for pos, (si, stage) in enumerate(stages):
            state = None
            if resume is not None:
                if si < resume["stage_index"]:
                    continue  # finished before the checkpoint
                if si == resume["stage_index"]:
                    if resume["stage_step"] >= stage.steps:
                        prev_ckpt = inputs.resume_path  # finished: the next stage starts from it
                        continue
                    state = resume
                else:  # the checkpoint's stage is not among the selected ones
                    prev_ckpt = prev_ckpt or inputs.resume_path
            if run.max_steps is not None and step >= run.max_steps:
                break
            init = None
            if state is None and stage.init == "previous":
                if not prev_ckpt:
                    raise ValueError(
                        f"stage {stage.name} fine-tunes a pre-trained model: give "
                        f"--pretrained CKPT (or run the stage before it)"
                    )
                init = prev_ckpt
            elif state is None and pos == 0 and run.pretrained:
                init = run.pretrained
            sr = build_stage(
                rt, run, si, stage, init=init, state=state, resume_path=inputs.resume_path if state else None
            )
            log.info(
                f"stage {stage.name} ({si}): {stage.model} {stage.image_size}px ctx "
                f"{sr.model.cfg.text.context_length} pos {stage.pos_embed} mask {stage.mask}:"
                f"{stage.mask_ratio} | batch {stage.batch_size} lr {stage.resolved_lr:.3g} warmup "
                f"{stage.warmup} steps {stage.steps} | from "
                f"{'step ' + str(sr.stage_step) if state else init or 'scratch'}"
            )
            result = run_stage(
                rt,
                run,
                log,
                sr,
                step,
                precision=precision,
                eval_set=inputs.eval,
                config_json=config_json,
                stage_ends=stage_ends,
                resumed=state is not None,
                signals=signals,
            )
            step = result["step"]
            summary["stages"].append(result)
            summary["stopped_by"] = result["stopped_by"]
            if not result["finished"]:
                break
            prev_ckpt = result["checkpoint"]
        if not summary["stages"]:
            log.info(f"nothing to run: the selected stages finished by step {step}")
    finally:
        log.close()
    summary["step"] = step
    rt.barrier()
    return summary


def run_stage(
    rt,
    run: RunConfig,
    log: Logger,
    sr: StageRun,
    step: int,
    *,
    precision: str,
    eval_set: EvalSet | None,
    config_json: str,
    stage_ends: list,
    resumed: bool,
    signals: cli.StopSignals,
) -> dict:
    """Step one built stage to its end (or --max-steps, or a stop signal), saving and evaluating
    on the way."""
    stage = sr.stage
    t_start = last_save = time.time()
    saved_at = sr.stage_step if resumed else -1  # stage step of the newest checkpoint
    log.start_stage(sr.stage_step)

    def checkpoint() -> bool:
        st = {
            "step": step,
            "stage_index": sr.index,
            "stage_name": stage.name,
            "stage_step": sr.stage_step,
            "samples": sr.samples,
            "config": config_json,
            "data": sr.loader.state_dict(),
            "stage_ends": list(stage_ends),
        }
        return save_checkpoint(rt, run, sr.wmodel, sr.optimizer, st, stage) is not None

    finished, stopped_by, first = True, None, True
    while sr.stage_step < stage.steps:
        if run.max_steps is not None and step >= run.max_steps:
            finished = False
            break
        t0 = time.time()
        images, tokens = next(sr.batches)
        log.data_wait += time.time() - t0
        lr, t0 = lr_at(sr.stage_step, stage), time.time()
        loss = train_step(
            rt,
            sr.wmodel,
            sr.optimizer,
            images,
            tokens,
            lr,
            precision=precision,
            accum_steps=run.accum_steps,
            skip_nonfinite=run.nonfinite == "skip",
            fns=sr.fns,
        )
        step, sr.stage_step, sr.samples = step + 1, sr.stage_step + 1, sr.samples + stage.batch_size
        if sr.stage_step % run.log_every == 0 or sr.stage_step in (1, stage.steps):
            rt.add_step_closure(
                log.step,
                (
                    stage,
                    loss,
                    sr.model.logit_scale.detach(),
                    lr,
                    step,
                    sr.stage_step,
                    sr.samples,
                    sum(sr.loader.skipped.values()),
                ),
            )
        rt.step_boundary()
        # decisions that gate a collective are agreed by every process; one host read per step
        nonfinite, stop, late = rt.agree_each(
            [
                not math.isfinite(loss.item()),
                signals.received is not None,
                sr.stage_step % 10 == 0 and time.time() - last_save > run.save_minutes * 60,
            ]
        )
        if run.compile and first:
            log.info(f"compiled the step in {time.time() - t0:.1f}s (torch.compile, once per stage)")
        first = False
        if nonfinite and run.nonfinite == "stop":
            raise RunStopped(
                f"the loss is not finite at step {step} ({stage.name} step {sr.stage_step}): "
                f"stopped without saving; the newest good checkpoint stays in "
                f"{checkpoint_root(run.out)} (lower the lr, or --nonfinite skip)"
            )
        if nonfinite:
            log.info(f"warning: the loss is not finite at step {step}: its update was skipped")
        if stop:
            stopped_by, finished = signals.received or signal.SIGTERM, False
            break
        if run.eval_every and sr.stage_step % run.eval_every == 0 and eval_set:
            run_eval(rt, log, sr, eval_set, step, precision, run)
        if (sr.stage_step % run.save_every == 0 or late) and sr.stage_step < stage.steps:
            if checkpoint():
                saved_at = sr.stage_step
            last_save = time.time()

    if finished:
        stage_ends.append(f"step_{step:08d}")  # kept by --keep pruning: the next stage's init
    if saved_at != sr.stage_step and not checkpoint():
        raise RunStopped(
            f"the checkpoint of step {step} could not be written (see the warning above); "
            f"the newest complete one stays in {checkpoint_root(run.out)}"
        )
    ckpt = os.path.join(checkpoint_root(run.out), f"step_{step:08d}")
    if stopped_by is not None:
        log.info(
            f"stopped by {signal.Signals(stopped_by).name} at step {step}; checkpoint {ckpt}; "
            f"continue with --resume latest"
        )
    metrics = run_eval(rt, log, sr, eval_set, step, precision, run) if finished and eval_set else None
    elapsed = time.time() - t_start
    log.info(
        f"stage {stage.name} {'done' if finished else 'stopped'} at step {step} ({elapsed:.1f}s); checkpoint {ckpt}"
    )
    return {
        "name": stage.name,
        "step": step,
        "stage_step": sr.stage_step,
        "finished": finished,
        "checkpoint": ckpt,
        "seconds": elapsed,
        "eval": metrics,
        "compiles": rt.compile_count(),
        "stopped_by": stopped_by,
    }


def run_eval(rt, log: Logger, sr: StageRun, ev: EvalSet, step: int, precision: str, run: RunConfig) -> dict:
    """Zero-shot classification / retrieval with the trainer's runtime and precision (every rank)."""
    kw = dict(runtime=rt, precision=precision, batch_size=run.eval_batch_size, num_workers=run.workers)
    res = {}
    if ev.data:
        res = eval_zeroshot.evaluate(
            sr.model, sr.model.cfg, ev.data, classnames=ev.classnames, templates=ev.templates, **kw
        )
        log.info(f"step {step} zero-shot: top1 {res['top1']:.4f} top5 {res['top5']:.4f} (n={res['n']})")
    if ev.retrieval:
        r = eval_zeroshot.evaluate_retrieval(sr.model, sr.model.cfg, ev.retrieval, **kw)
        res.update({f"retrieval_{k}": v for k, v in r.items()})
        log.info(
            f"step {step} retrieval R@1: image->text {r['image_to_text_R@1']:.4f} text->image "
            f"{r['text_to_image_R@1']:.4f} ({r['images']} images, {r['texts']} captions)"
        )
    log.record({"step": step, "stage": sr.stage.name, **{f"eval_{k}": v for k, v in res.items()}})
    return res


# ----------------------------------------------------------------------------- CLI


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str, finetune: bool = False) -> cli.ArgumentParser:
    """The command line, generated from RunConfig's fields (run options) and Stage's fields
    (each applies to every selected stage; --set STAGE.FIELD=V targets one stage)."""
    desc = (
        __doc__.split("\n\n")[0]
        if not finetune
        else "CLIPA fine-tuning: the preset's fine-tune stage(s) from a pre-trained checkpoint."
    )
    p = cli.ArgumentParser(prog=prog, description=desc)
    for f in dataclasses.fields(RunConfig):
        kw = dict(
            dest=f.name,
            default=None,
            help=f.metadata["help"],
            required=f.metadata.get("required", False) or (finetune and f.name == "pretrained"),
        )
        if f.type == "bool":
            p.add_argument(_flag(f.name), action="store_true", **kw)
        else:
            p.add_argument(_flag(f.name), metavar="V", choices=f.metadata.get("choices"), **kw)
    for f in STAGE_FIELDS.values():
        p.add_argument(
            _flag(f.name), dest=f"stage__{f.name}", default=None, metavar="V", help=f"stage field: {f.metadata['help']}"
        )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[STAGE.]FIELD=VALUE",
        help="override any stage field, e.g. --set finetune.batch_size=4096",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved stages and exit")
    p.add_argument("--flops", action="store_true", help="print the stages' FLOPs table and exit")
    return p


def parse_args(argv, prog="train.py", finetune=False):
    """argv -> (RunConfig, [(index, Stage)], namespace). Raises ValueError on bad values."""
    a = build_parser(prog, finetune).parse_args(argv)
    given = {f: getattr(a, f.name) for f in dataclasses.fields(RunConfig) if getattr(a, f.name) is not None}
    run = RunConfig(**{f.name: v if isinstance(v, bool) else _parse_value(f.name, f.type, v) for f, v in given.items()})
    run.out = run.out or os.path.join("runs", run.cfg)
    overrides = [
        (None, name, getattr(a, f"stage__{name}")) for name in STAGE_FIELDS if getattr(a, f"stage__{name}") is not None
    ]
    for item in a.set:
        if "=" not in item:
            raise ValueError(f"--set expects [STAGE.]FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        sel, _, fname = key.rpartition(".")
        overrides.append((sel or None, fname, value))
    if run.cfg not in PRESETS:
        raise ValueError(f"unknown preset {run.cfg!r}; valid: {', '.join(PRESETS)}")
    if finetune and run.stage is None:  # finetune.py: the stages that start from a previous one
        run.stage = ",".join(s.name for s in PRESETS[run.cfg].stages if s.init == "previous")
    stages = resolve_stages(run.cfg, overrides, run.stage)
    for f in dataclasses.fields(RunConfig):
        value, lo = getattr(run, f.name), f.metadata.get("min")
        if lo is not None and value is not None and value < lo:
            raise ValueError(f"{_flag(f.name)} must be >= {lo}, got {value}")
    return run, stages, a


def describe_stages(run: RunConfig, stages) -> str:
    return "\n".join(
        [f"preset {run.cfg}: {PRESETS[run.cfg].description}"]
        + [json.dumps({**dataclasses.asdict(s), "index": i, "lr": s.resolved_lr, "steps": s.steps}) for i, s in stages]
    )


def main(argv=None, prog="train.py", finetune=False) -> int:
    """Exit status: 0 done (or stopped at --max-steps), 2 bad input (one line, found before the
    first step), 1 the run could not go on (one line: non-finite loss, checkpoint not written),
    128 + N stopped by signal N after saving (143 SIGTERM, 130 SIGINT). Any other error inside the
    run keeps its traceback."""
    try:
        run, stages, a = parse_args(sys.argv[1:] if argv is None else argv, prog, finetune)
        if a.dry_run or a.flops or run.plan:
            print(
                describe_stages(run, stages)
                if a.dry_run
                else flops_table(stages)
                if a.flops
                else plan.report(stages, gpu_mem=run.gpu_mem, devices=run.devices)
            )
            return 0
        inputs = check_inputs(run, stages)
        rt = xla_utils.init_runtime(run.device)
    except (ValueError, FileNotFoundError) as e:
        return cli.usage_error(e)
    lock = checkpoints.RunLock(run.out)
    try:
        try:
            check_layout(rt, run, stages, inputs)
            if rt.is_master:
                lock.acquire()
        except ValueError as e:
            return cli.usage_error(e)
        if lock.previous:
            print(f"taking over the lock of a run that ended without releasing it ({lock.previous})", flush=True)
        if rt.is_master:
            checkpoints.remove_temporaries(checkpoint_root(run.out))  # left by a kill mid-save
        summary = run_training(rt, run, stages, inputs, cli.StopSignals().install())
    except RunStopped as e:
        return cli.usage_error(e, status=1)
    finally:
        lock.release()
        rt.shutdown()
    return 128 + summary["stopped_by"] if summary["stopped_by"] else 0


if __name__ == "__main__":
    sys.exit(main())
