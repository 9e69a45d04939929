"""What a run is asked to do: the papers' presets, the per-stage and per-run options, and the command
line generated from them.

A preset is a list of stages (pre-train at few tokens, then fine-tune at full length). Every option is
declared once, as a field of `Stage` (per stage) or `RunConfig` (per run), with its help text and its
bounds beside its default; the command line of train.py and finetune.py is generated from those fields,
and each dataclass checks itself in `__post_init__`. The recipe's numbers are explained in docs/recipe.md.
"""

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field, replace

import cli
import losses
import model as model_lib
import shards
import tokenizer as tokenizer_lib
import trackers
import xla_utils


def opt(default, help: str, **meta):
    """A dataclass field with its command-line help, and optionally `choices`, `min` and `required`."""
    return field(default=default, metadata=dict(help=help, **meta))


def _check_fields(obj, label) -> None:
    """The checks each field declares in its metadata: allowed values and a lower bound. label(name)
    is how an error names the field (a stage's field, or a run option's flag)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed = f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            valid = ", ".join(str(a) for a in allowed)
            raise ValueError(f"{label(f.name)}={value!r}; valid: {valid}")
        low = f.metadata.get("min")
        if low is not None and value is not None and value < low:
            raise ValueError(f"{label(f.name)} must be >= {low}, got {value}")


# ----------------------------------------------------------------------------- stages and presets

INITS = ("scratch", "previous")


@dataclass(frozen=True)
class Stage:
    """One training phase. The peak lr follows the papers' rule: lr = base_lr x batch_size / 256."""

    name: str
    model: str = opt("", "registry name of the model (model.py)")
    image_size: int = opt(224, "training resolution: CLIPA's image token reduction by resizing", min=1)
    context_length: int | None = opt(None, "text tokens (None: the model's own, T8/T16/T32 in its name)", min=1)
    text_reduction: str | None = opt(
        None, "text token reduction (None: the model's)", choices=(None, *tokenizer_lib.REDUCTIONS)
    )
    word_counts: str | None = opt(
        None, "text_reduction frequency: the word counts of the training captions (`python data.py counts`)"
    )
    frequency_threshold: float = opt(
        tokenizer_lib.FREQUENCY_THRESHOLD,
        "text_reduction frequency: t of the drop probability 1 - sqrt(t / f(word)) (CLIPF's code: 1e-6)",
    )
    pos_embed: str = opt("sincos", "image position embedding", choices=model_lib.POS_EMBEDS)
    mask: str = opt("none", "image token masking", choices=model_lib.MASK_STRATEGIES)
    mask_ratio: float = opt(0.0, "fraction of image patches masked")
    batch_size: int = opt(256, "global batch (all devices, all accumulation steps)", min=1)
    base_lr: float = opt(8e-6, "lr per 256 samples")
    lr: float | None = opt(None, "peak lr (None: base_lr x batch_size / 256)")
    warmup: int = opt(0, "linear warmup steps")
    train_num_samples: int = opt(0, "samples seen in this stage: steps = samples // batch", min=1)
    weight_decay: float = opt(0.2, "AdamW weight decay (weight matrices only)")
    color_jitter: bool = opt(False, "colour jitter augmentation")
    scale_min: float = opt(0.4, "RandomResizedCrop scale=(scale_min, 1)")
    train_data: str = opt("", "training shards: webdataset tars, TFRecords or a TFDS dir")
    train_data_weights: str = opt(
        "",
        "a weighted mixture: one positive weight per '::'-joined source of train_data (3::1: three samples "
        "from the first for each from the second); empty: the sources' shards are read as one list",
    )
    train_format: str | None = opt(
        None, "shard format (None: detected from the bytes)", choices=(None, *shards.FORMATS)
    )
    init: str = opt("scratch", "start from scratch or the previous stage / --pretrained", choices=INITS)
    loss: str = opt("softmax", "contrastive loss: softmax (CLIP) or sigmoid (SigLIP)", choices=losses.LOSSES)

    def __post_init__(self):
        """Reject a stage that cannot run, with a one-line reason, before anything is built. A
        template without a model (the papers' shared stage settings) skips the model's checks."""
        where = f"stage {self.name}: "
        _check_fields(self, lambda name: where + name)
        if self.warmup < 0 or self.weight_decay < 0 or self.resolved_lr <= 0:
            raise ValueError(
                f"{where}warmup and weight_decay must be >= 0 and lr > 0 "
                f"(got warmup {self.warmup}, weight_decay {self.weight_decay}, lr {self.resolved_lr})"
            )
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"{where}scale_min must be in (0, 1], got {self.scale_min}")
        if self.steps < 1:
            raise ValueError(
                f"{where}train_num_samples {self.train_num_samples} < batch_size {self.batch_size} (no step to run)"
            )
        weights = self.mixture_weights  # a weight that is not a positive number is an error here
        sources = shards.split_sources(self.train_data)
        if weights and self.train_data and len(weights) != len(sources):
            raise ValueError(
                f"{where}train_data_weights {self.train_data_weights!r} gives {len(weights)} weight(s) for "
                f"{len(sources)} '::'-joined source(s) of train_data"
            )
        if self.model:
            try:  # unknown model, a size the patch does not divide, a mask ratio out of range
                model_lib.check_config(self.model_config())
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
        if self.text_reduction == "frequency":
            if not self.word_counts:
                raise ValueError(
                    f"{where}text_reduction frequency needs word counts: give --word-counts FILE "
                    f"(written by `python data.py counts SPEC --out FILE`)"
                )
            if not 0 < self.frequency_threshold <= 1:
                raise ValueError(f"{where}frequency_threshold must be in (0, 1], got {self.frequency_threshold}")
            try:  # a missing, corrupt or oversized counts file, or one for the other tokenizer
                if self.model:
                    self.tokenizer()
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None

    @property
    def mixture_weights(self) -> tuple[float, ...] | None:
        """train_data_weights as numbers, None without a mixture; ValueError for a weight that is not
        a positive number."""
        if not self.train_data_weights:
            return None
        try:
            weights = tuple(float(w) for w in self.train_data_weights.split("::"))
        except ValueError:
            weights = ()
        if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(
                f"stage {self.name}: train_data_weights {self.train_data_weights!r}: give one positive "
                f"number per source, joined by '::' (e.g. 3::1)"
            )
        return weights

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr * self.batch_size / 256

    @property
    def steps(self) -> int:
        return self.train_num_samples // self.batch_size

    def tokenizer(self) -> tokenizer_lib.Tokenizer:
        """The training tokenizer: the model's, at this stage's text length and reduction."""
        text = self.model_config().text
        return tokenizer_lib.Tokenizer(
            text.tokenizer,
            text.context_length,
            self.text_reduction or text.reduction,
            word_counts=self.word_counts,
            threshold=self.frequency_threshold,
        )

    def model_config(self) -> model_lib.CLIPConfig:
        cfg = model_lib.get_model_config(
            self.model,
            image_size=self.image_size,
            context_length=self.context_length,
            pos_embed=self.pos_embed,
            mask=self.mask,
            mask_ratio=self.mask_ratio,
        )
        return replace(cfg, loss=self.loss)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    stages: tuple[Stage, ...]
    reported: str = ""  # the paper's result for this recipe


# The papers' stage templates; each preset below names only what differs from its template.
# v1 pre-training: 2.56B samples (about 6.4 epochs of LAION-400M); fine-tuning: 131M samples at 224 px.
V1_PRETRAIN = Stage("pretrain", base_lr=8e-6, train_num_samples=2_560_000_000)
V1_FINETUNE = Stage(
    "finetune",
    image_size=224,
    pos_embed="learnable",
    base_lr=8e-7,
    train_num_samples=131_072_000,
    init="previous",
)
# v2: one progressive schedule, 12.8B samples at 84 px / 8 tokens, then 512M at 224 px (30% random
# masking), then 128M at 336 px (40%); position embeddings stay sin-cos
V2_PRETRAIN = Stage(
    "pretrain",
    image_size=84,
    batch_size=65536,  # peak lr 65536 x 8e-6 / 256 = 2.048e-3
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
    batch_size=32768,  # peak lr 32768 x 4e-7 / 256 = 5.12e-5
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
    batch_size=16384,  # peak lr 16384 x 1e-7 / 256 = 6.4e-6
    base_lr=1e-7,
    warmup=1600,
    train_num_samples=131_072_000,
    color_jitter=True,
    init="previous",
)

_PRESET_LIST = [
    Preset(
        name="b16_i50_t16",
        description="v1 B/16: pre-train 112 px (I50) / 16 tokens, fine-tune 224 px",
        reported="63.2% IN-1K zero-shot, ~2 days on 8xA100 (LAION-400M)",
        stages=(
            # peak lr 65536 x 8e-6 / 256 = 2.048e-3; 2.56B / 65536 = 39,062 steps
            replace(V1_PRETRAIN, model="ViT-B-16-CL16", image_size=112, batch_size=65536, warmup=782),
            # peak lr 8192 x 8e-7 / 256 = 2.56e-5; 131M / 8192 = 16,000 steps
            replace(V1_FINETUNE, model="ViT-B-16-CL16", batch_size=8192, warmup=3072),
        ),
    ),
    Preset(
        name="l16_i17_t16",
        description="v1 L/16: pre-train 64 px (I17) / 16 syntax tokens, fine-tune 224 px",
        reported="67.8% IN-1K zero-shot, ~3 days on 8xA100 (LAION-400M)",
        stages=(
            # peak lr 32768 x 8e-6 / 256 = 1.024e-3; 78,125 steps
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
            # peak lr 7168 x 8e-7 / 256 = 2.24e-5; 131M / 7168 = 18,285 steps
            replace(V1_FINETUNE, model="ViT-L-16-CL32-GAP", batch_size=7168, warmup=3571, color_jitter=True),
        ),
    ),
    Preset(
        name="h14_i36_t8",
        description="v1-code H/14: pre-train 84 px (I36) / 8 syntax tokens, fine-tune 224 px with 30% random "
        "masking (the reference's TPU scripts)",
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
    Preset(
        name="demo",
        description="tiny CPU demo on the procedural data of launch/demo_data.py: 32 px / 16 syntax tokens, "
        "then 64 px / 32 tokens with 30% random masking and learnable position embeddings",
        reported="a smoke test, not a result",
        stages=(
            # a long warmup matters: at 2e-3 with 10 warmup steps the tiny model sits at chance
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
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}

STAGE_FIELDS = {f.name: f for f in dataclasses.fields(Stage) if f.name != "name"}


def parse_value(name: str, annotation, text: str):
    """A command-line string -> a value of the field's type (int, float, bool, str, or optional)."""
    options = typing.get_args(annotation) or (annotation,)
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    kind = next(t for t in options if t is not type(None))
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            number = float(text.replace("_", ""))
            if number != int(number):
                raise ValueError
            return int(number)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"bad value {text!r} for {name} (expects {_type_name(annotation)})") from None
    return text


def _type_name(annotation) -> str:
    options = typing.get_args(annotation) or (annotation,)
    return " | ".join("None" if t is type(None) else t.__name__ for t in options)


def resolve_stages(cfg: str, overrides=(), select: str | None = None) -> list[tuple[int, Stage]]:
    """The preset's stages with overrides applied, as (index in the preset, Stage).

    overrides: (stage or None for all, field, text) triples; a stage is named or indexed.
    select: comma-separated stage names or indices to run (None: all)."""
    if cfg not in PRESETS:
        raise ValueError(f"unknown preset {cfg!r}; valid: {', '.join(PRESETS)}")
    stages = list(PRESETS[cfg].stages)
    names = [s.name for s in stages]

    def index_of(selector: str) -> int:
        if selector.isdigit() and int(selector) < len(stages):
            return int(selector)
        if selector in names:
            return names.index(selector)
        raise ValueError(
            f"unknown stage {selector!r} of preset {cfg}; valid: {', '.join(names)} (or 0..{len(stages) - 1})"
        )

    types = typing.get_type_hints(Stage)
    changes: list[dict] = [{} for _ in stages]
    for selector, name, text in overrides:
        if name not in STAGE_FIELDS:
            raise ValueError(f"unknown field {name!r}; valid: {', '.join(STAGE_FIELDS)}")
        value = parse_value(name, types[name], text)
        targets = range(len(stages)) if selector is None else [index_of(selector)]
        for i in targets:
            changes[i][name] = value
    # all of a stage's overrides at once: a stage is checked whole, never half-changed
    stages = [replace(s, **c) if c else s for s, c in zip(stages, changes)]
    if select:
        chosen = sorted({index_of(s.strip()) for s in select.split(",")})
    else:
        chosen = range(len(stages))
    return [(i, stages[i]) for i in chosen]


def flops_table(stages: list[tuple[int, Stage]]) -> str:
    """A Markdown table of the stages: tokens, forward GFLOPs per sample (the papers' convention,
    1 multiply-add = 1 FLOP) and the stage's training compute (3 x forward x samples)."""
    rows = [
        "| stage | model | image px | patches kept | text tokens | GFLOPs/sample | samples | training EFLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, s in stages:
        cfg = s.model_config()
        f = model_lib.count_flops(cfg, mask_ratio=s.mask_ratio)
        samples = s.steps * s.batch_size
        eflops = 3 * f["total_gflops"] * samples / 1e9
        rows.append(
            f"| {s.name} | {s.model} | {s.image_size} | {f['patches_kept']}/{f['patches']} | "
            f"{cfg.text.context_length} | {f['total_gflops']:.2f} | {samples:,} | {eflops:.1f} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------- run options

NONFINITE = ("stop", "skip")


@dataclass
class RunConfig:
    """Options of the whole run (every stage)."""

    cfg: str = opt("", "preset: " + ", ".join(PRESETS), required=True)
    stage: str | None = opt(None, "stages to run: names or indices, comma-separated (default all)")
    out: str = opt("", "output directory (default runs/CFG)")
    device: str = opt("auto", "where to train", choices=xla_utils.DEVICES)
    precision: str = opt("auto", "auto: bf16 autocast on CUDA, fp32 on XLA and CPU", choices=xla_utils.PRECISIONS)
    seed: int = opt(0, "random seed")
    workers: int = opt(2, "data loader workers per process", min=0)
    log_every: int = opt(10, "progress line every N steps", min=1)
    decide_every: int = opt(
        10,
        "every N steps (and at each save and eval) the host reads the non-finite count and all processes "
        "agree on stop signals and time-based saves; between them the steps never wait for the device",
        min=1,
    )
    report_to: str = opt(
        "tensorboard",
        "experiment trackers, comma-separated: tensorboard, wandb (pip install wandb), or none",
    )
    save_every: int = opt(1000, "checkpoint every N steps", min=1)
    save_minutes: float = opt(60.0, "... and when this many minutes passed since the last save", min=0)
    keep: int = opt(3, "checkpoints kept (older ones are deleted; each stage's last stays)", min=1)
    resume: str | None = opt(
        None,
        "auto: the newest whole checkpoint in --out, or a fresh start when it has none (the command to "
        "re-run after every stop); latest: the same, but an --out without checkpoints is an error; or a "
        "checkpoint directory. Without it, an --out that holds checkpoints is refused",
    )
    pretrained: str | None = opt(None, "weights for the first stage: checkpoint dir, .safetensors or OpenCLIP file")
    eval_every: int = opt(0, "zero-shot eval every N steps (0: only at the end of each stage)", min=0)
    eval_data: str | None = opt(None, "ImageFolder / TFDS dir for zero-shot eval")
    eval_split: str | None = opt(None, "TFDS split of --eval-data (default: validation, else its only split)")
    eval_retrieval: str | None = opt(
        None,
        "captioned set for image-text retrieval eval (CLIP_benchmark wds / flickr30k / mscoco_captions root, "
        "or caption shards)",
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
    gpus_per_node: int = opt(8, "--plan: GPUs per node (one NVLink domain)", min=1)
    nvlink_gbs: float = opt(450.0, "--plan: GB/s per GPU and direction within a node (450: H100's NVLink 4)", min=0.001)
    network_gbs: float = opt(
        50.0, "--plan: GB/s per GPU and direction between nodes (50: one 400 Gb/s InfiniBand NDR adapter)", min=0.001
    )
    mfu: float = opt(
        0.5, "--plan: model-FLOPs utilisation the compute time assumes, in (0, 1] (default 0.5)", min=0.001
    )
    peak_tflops: float = opt(
        989.0, "--plan: the GPU's dense peak TFLOP/s at the step's precision (989: H100 SXM, bf16)", min=0.001
    )
    force_resume: bool = opt(
        False,
        "resume although stage settings, seed, workers, accumulation or world size differ from the "
        "checkpoint's (the continuation is not exact)",
    )

    def __post_init__(self):
        if self.cfg not in PRESETS:
            raise ValueError(f"unknown preset {self.cfg!r}; valid: {', '.join(PRESETS)}")
        _check_fields(self, flag)
        if self.mfu > 1:
            raise ValueError(f"--mfu is a fraction of the peak, in (0, 1]; got {self.mfu}")
        trackers.parse_report_to(self.report_to)
        self.out = self.out or os.path.join("runs", self.cfg)


# ----------------------------------------------------------------------------- the command line


def flag(name: str) -> str:
    """A field's command-line flag: accum_steps -> --accum-steps."""
    return "--" + name.replace("_", "-")


def _help(f: dataclasses.Field) -> str:
    """A field's help with its allowed values: the metavar V hides argparse's own list of choices."""
    allowed = [str(c) for c in f.metadata.get("choices") or () if c is not None]
    return f.metadata["help"] + (f" (one of: {', '.join(allowed)})" if allowed else "")


def build_parser(prog: str, finetune: bool = False) -> cli.ArgumentParser:
    """The command line, generated from RunConfig's fields (run options) and Stage's fields (each
    applies to every selected stage; --set STAGE.FIELD=V targets one stage)."""
    if finetune:
        description = "CLIPA fine-tuning: the preset's fine-tune stage(s) from a pre-trained checkpoint."
    else:
        description = "CLIPA training: presets, the contrastive step, checkpoints, resume, multi-stage schedules."
    p = cli.ArgumentParser(prog=prog, description=description)
    types = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        required = f.metadata.get("required", False) or (finetune and f.name == "pretrained")
        kw = dict(dest=f.name, default=None, help=_help(f), required=required)
        if types[f.name] is bool:
            p.add_argument(flag(f.name), action="store_true", **kw)
        else:
            p.add_argument(flag(f.name), metavar="V", choices=f.metadata.get("choices"), **kw)
    for f in STAGE_FIELDS.values():
        p.add_argument(
            flag(f.name), dest=f"stage__{f.name}", default=None, metavar="V", help=f"stage field: {_help(f)}"
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


def parse_args(argv, prog: str = "train.py", finetune: bool = False):
    """argv -> (RunConfig, [(index, Stage)], the parsed namespace). Raises ValueError on bad values."""
    args = build_parser(prog, finetune).parse_args(argv)
    types = typing.get_type_hints(RunConfig)
    given = {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name)
        if value is None:
            continue
        given[f.name] = value if isinstance(value, bool) else parse_value(f.name, types[f.name], value)
    run = RunConfig(**given)
    overrides = []
    for name in STAGE_FIELDS:
        value = getattr(args, f"stage__{name}")
        if value is not None:
            overrides.append((None, name, value))
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects [STAGE.]FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        selector, _, name = key.rpartition(".")
        overrides.append((selector or None, name, value))
    if finetune and run.stage is None:  # finetune.py: the stages that start from a previous one
        run.stage = ",".join(s.name for s in PRESETS[run.cfg].stages if s.init == "previous")
    stages = resolve_stages(run.cfg, overrides, run.stage)
    return run, stages, args


def describe_stages(run: RunConfig, stages: list[tuple[int, Stage]]) -> str:
    """--dry-run: the preset's description, then one JSON line per resolved stage."""
    lines = [f"preset {run.cfg}: {PRESETS[run.cfg].description}"]
    for i, s in stages:
        lines.append(json.dumps({**dataclasses.asdict(s), "index": i, "lr": s.resolved_lr, "steps": s.steps}))
    return "\n".join(lines)
