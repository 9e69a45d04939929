"""CLIPA models: ViT image tower + transformer text tower with image/text token reduction.

One registry (MODEL_CONFIGS) holds every architecture of the CLIPA papers. v1 models are
OpenCLIP-compatible CLIP; v2 "BigVision" models were converted from the authors' JAX code.
This module knows configs, towers and their costs (parameters, FLOPs); building a model by name with
its weights, the checkpoint layouts and the tokenizer a model implies are in factory.py.

CLI: python model.py {list, flops NAME}
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import cli
import xla_utils

# ----------------------------------------------------------------------------- configs

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool: str = "cls"  # "cls" | "gap_cls" (v1 GAP: mean incl. CLS) | "gap" (v2: patches only)
    pre_norm: bool = True  # ln_pre before the blocks (v1 yes, v2 no)
    pos_embed: str = "learnable"  # "learnable" | "sincos" (fixed 2-D, used in pre-training)
    mask: str = "none"  # image token reduction by masking: "none" | "random" | "grid" | "block"
    mask_ratio: float = 0.0  # fraction of patch tokens dropped when masking

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    causal: bool = True  # v1: causal mask; v2: bidirectional
    pool: str = "eot"  # "eot" (position of the largest id, v1) | "last" (index -1, v2)
    tokenizer: str = "clip_bpe"  # "clip_bpe" (v1) | "wordpiece" (v2, bert-base-uncased)
    reduction: str = "truncate"  # training-time text reduction: truncate | random | block | syntax


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    gelu: str = "exact"  # "exact" | "tanh"
    family: str = "v1"  # "v1" (OpenCLIP layout, OpenAI mean/std) | "v2" (BigVision)
    loss: str = "softmax"  # "softmax" (CLIP) | "sigmoid" (SigLIP: a learnable logit_bias too)

    # evaluation preprocessing defaults of the family (docs/models.md)
    @property
    def image_mean(self):
        return OPENAI_MEAN if self.family == "v1" else IMAGENET_MEAN

    @property
    def image_std(self):
        return OPENAI_STD if self.family == "v1" else IMAGENET_STD

    @property
    def interpolation(self) -> str:
        return "bicubic" if self.family == "v1" else "bilinear"

    @property
    def square_resize_only(self) -> bool:
        return self.family == "v2"


# v2 "BigVision" family settings; v1 is what VisionConfig/TextConfig default to
_V2_VISION = dict(patch_size=14, pool="gap", pre_norm=False)
_V2_TEXT = dict(context_length=32, vocab_size=32000, causal=False, pool="last", tokenizer="wordpiece")


def _v2(embed_dim: int, vision: dict, text: dict) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(**{**_V2_VISION, **vision}),
        text=TextConfig(**{**_V2_TEXT, **text}),
        gelu="tanh",
        family="v2",
    )


MODEL_CONFIGS: dict[str, CLIPConfig] = {
    # v1 (docs/models.md)
    "ViT-B-16-CL16": CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(patch_size=16, width=768, layers=12, heads=12, pool="cls"),
        text=TextConfig(context_length=16, width=512, layers=12, heads=8),
    ),
    "ViT-L-16-CL16-Syntax-GAP": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(patch_size=16, width=1024, layers=24, heads=16, pool="gap_cls"),
        text=TextConfig(context_length=16, width=768, layers=12, heads=12, reduction="syntax"),
    ),
    "ViT-L-16-CL8-Syntax-GAP": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(patch_size=16, width=1024, layers=24, heads=16, pool="gap_cls"),
        text=TextConfig(context_length=8, width=768, layers=12, heads=12, reduction="syntax"),
    ),
    "ViT-L-16-CL16-GAP": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(patch_size=16, width=1024, layers=24, heads=16, pool="gap_cls"),
        text=TextConfig(context_length=16, width=768, layers=12, heads=12),
    ),
    "ViT-L-16-CL32-GAP": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(patch_size=16, width=1024, layers=24, heads=16, pool="gap_cls"),
        text=TextConfig(context_length=32, width=768, layers=12, heads=12),
    ),
    "ViT-H-14-CL8-Syntax-GAP": CLIPConfig(
        embed_dim=1024,
        vision=VisionConfig(patch_size=14, width=1280, layers=32, heads=16, pool="gap_cls"),
        text=TextConfig(context_length=8, width=1024, layers=24, heads=16, reduction="syntax"),
    ),
    "ViT-H-14-CL32-GAP": CLIPConfig(
        embed_dim=1024,
        vision=VisionConfig(patch_size=14, width=1280, layers=32, heads=16, pool="gap_cls"),
        text=TextConfig(context_length=32, width=1024, layers=24, heads=16),
    ),
    # v2 "BigVision" (converted from JAX; OpenCLIP's ViT-{L,H,bigG}-14-CLIPA)
    "ViT-L-14-CL32-GAP-BigVision": _v2(
        embed_dim=768, vision=dict(width=1024, layers=24, heads=16), text=dict(width=768, layers=12, heads=12)
    ),
    "ViT-H-14-CL32-GAP-BigVision": _v2(
        embed_dim=1024, vision=dict(width=1280, layers=32, heads=16), text=dict(width=1024, layers=24, heads=16)
    ),
    "ViT-bigG-14-CL32-GAP-BigVision": _v2(
        embed_dim=1280,
        vision=dict(width=1664, layers=48, heads=16, mlp_ratio=4.9231),
        text=dict(width=1280, layers=32, heads=20),
    ),
    # tiny models for tests and the CPU demo (same code paths, few parameters)
    "ViT-Tiny-8-CL16-Syntax-GAP": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, pool="gap_cls"),
        text=TextConfig(context_length=16, width=128, layers=4, heads=4, reduction="syntax"),
    ),
    "ViT-Tiny-8-CL32-GAP": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, pool="gap_cls"),
        text=TextConfig(context_length=32, width=128, layers=4, heads=4),
    ),
    # the toy ladder of launch/sweep.py (width and depth grow together; the stage sets size, length, reduction)
    **{
        f"ViT-Toy{size}-8-CL16-GAP": CLIPConfig(
            embed_dim=width,
            vision=VisionConfig(
                image_size=32, patch_size=8, width=width, layers=layers, heads=width // 32, pool="gap_cls"
            ),
            text=TextConfig(context_length=16, width=width, layers=layers, heads=width // 32),
        )
        for size, width, layers in (("S", 64, 2), ("M", 96, 3), ("L", 128, 4), ("XL", 192, 6))
    },
    "ViT-Test-8-CL16": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(context_length=16, width=32, layers=2, heads=2),
    ),
    "ViT-Test-8-CL32-GAP-BigVision": _v2(
        embed_dim=32,
        vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=dict(width=32, layers=2, heads=2),
    ),
}

# Names used elsewhere for the same architectures: the reference scripts' misspellings
# (docs/models.md) and OpenCLIP's names for the converted v2 models.
MODEL_ALIASES: dict[str, tuple[str, dict]] = {
    "ViT-L-16-CL8-SyntaxMask-GAP": ("ViT-L-16-CL8-Syntax-GAP", {}),
    "ViT-L-16-CL16-SyntaxMask-GAP": ("ViT-L-16-CL16-Syntax-GAP", {}),
    "ViT-H-14-CL8-SyntaxMask-GAP": ("ViT-H-14-CL8-Syntax-GAP", {}),
    "ViT-L-14-CLIPA": ("ViT-L-14-CL32-GAP-BigVision", {}),
    "ViT-H-14-CLIPA": ("ViT-H-14-CL32-GAP-BigVision", {}),
    "ViT-bigG-14-CLIPA": ("ViT-bigG-14-CL32-GAP-BigVision", {}),
    "ViT-L-14-CLIPA-336": ("ViT-L-14-CL32-GAP-BigVision", {"image_size": 336}),
    "ViT-H-14-CLIPA-336": ("ViT-H-14-CL32-GAP-BigVision", {"image_size": 336}),
    "ViT-bigG-14-CLIPA-336": ("ViT-bigG-14-CL32-GAP-BigVision", {"image_size": 336}),
}


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def get_model_config(
    name: str,
    image_size: int | None = None,
    context_length: int | None = None,
    pos_embed: str | None = None,
    mask: str | None = None,
    mask_ratio: float | None = None,
) -> CLIPConfig:
    """Resolve a model name (or alias) to its config, with optional build-time overrides.

    image_size is CLIPA's "resize" image token reduction (force_image_size)."""
    if name in MODEL_ALIASES:
        base, vision_over = MODEL_ALIASES[name]
        cfg = with_overrides(MODEL_CONFIGS[base], **vision_over)
    elif name in MODEL_CONFIGS:
        cfg = MODEL_CONFIGS[name]
    else:
        close = difflib.get_close_matches(name, list(MODEL_CONFIGS) + list(MODEL_ALIASES), n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}" if close else f"; known: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    return with_overrides(
        cfg, image_size=image_size, context_length=context_length, pos_embed=pos_embed, mask=mask, mask_ratio=mask_ratio
    )


def with_overrides(
    cfg: CLIPConfig,
    *,
    image_size: int | None = None,
    context_length: int | None = None,
    pos_embed: str | None = None,
    mask: str | None = None,
    mask_ratio: float | None = None,
) -> CLIPConfig:
    """cfg with the build-time overrides that are not None (unchecked: see check_config)."""
    vision = {"image_size": image_size, "pos_embed": pos_embed, "mask": mask, "mask_ratio": mask_ratio}
    vision = {k: v for k, v in vision.items() if v is not None}
    text = {} if context_length is None else {"context_length": context_length}
    return replace(cfg, vision=replace(cfg.vision, **vision), text=replace(cfg.text, **text))


def block_parameters(width: int, hidden: int) -> int:
    """Parameters of one transformer Block of `width` with an MLP of `hidden` units."""
    norms = 2 * 2 * width  # ln_1, ln_2: weight and bias
    attention = 3 * width * width + 3 * width + width * width + width  # qkv and out projections
    mlp = width * hidden + hidden + hidden * width + width
    return norms + attention + mlp


def count_parameters(cfg: CLIPConfig, *, trainable: bool = False) -> int:
    """Elements of the state dict of `cfg` (parameters and the fixed sin-cos table), from the
    config alone: what building it would allocate, known before anything is allocated.
    trainable=True leaves out the sin-cos table (a buffer): what the optimizer holds state for."""
    v = cfg.vision
    t = cfg.text
    vision_pos = (v.grid**2 + 1) * v.width
    vision = (
        3 * v.patch_size**2 * v.width  # conv1, no bias
        + v.width  # class embedding
        + vision_pos
        + 2 * v.width * bool(v.pre_norm)
        + v.layers * block_parameters(v.width, int(v.width * v.mlp_ratio))
        + 2 * v.width  # ln_post
        + v.width * cfg.embed_dim
    )
    text = (
        t.vocab_size * t.width
        + t.context_length * t.width
        + t.layers * block_parameters(t.width, int(t.width * t.mlp_ratio))
        + 2 * t.width  # ln_final
        + t.width * cfg.embed_dim
    )
    logits = 1 + (cfg.loss == "sigmoid")  # logit_scale (and logit_bias)
    if trainable and v.pos_embed == "sincos":
        vision -= vision_pos
    return vision + text + logits


def _check_numbers(cfg: CLIPConfig) -> None:
    """Sizes are positive integers and MLP ratios sane numbers: a config read from a file may hold
    anything (1e12, -3, "12", [])."""
    v = cfg.vision
    t = cfg.text
    for where, obj, names in (
        ("", cfg, ("embed_dim",)),
        ("vision.", v, ("image_size", "patch_size", "width", "layers", "heads")),
        ("text.", t, ("context_length", "vocab_size", "width", "layers", "heads")),
    ):
        for name in names:
            x = getattr(obj, name)
            if not isinstance(x, int) or isinstance(x, bool) or x < 1:
                raise ValueError(f"bad model config: {where}{name} = {x!r} (expected a positive integer)")
    for where, obj in (("vision.", v), ("text.", t)):
        r = obj.mlp_ratio
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= 64:
            raise ValueError(f"bad model config: {where}mlp_ratio = {r!r} (expected a number in (0, 64])")
        if obj.width % obj.heads:
            raise ValueError(f"bad model config: {where}width {obj.width} is not divisible by {obj.heads} heads")
    if not isinstance(v.mask_ratio, (int, float)) or isinstance(v.mask_ratio, bool):
        raise ValueError(f"bad model config: vision.mask_ratio = {v.mask_ratio!r} (expected a number)")


def check_config(cfg: CLIPConfig) -> CLIPConfig:
    """Reject settings the model cannot build, with a one-line reason; and sizes no real model has
    (a crafted config in a checkpoint must not make us allocate until the machine dies)."""
    _check_numbers(cfg)
    v = cfg.vision
    t = cfg.text
    if v.image_size % v.patch_size:
        raise ValueError(f"image size {v.image_size} is not a multiple of the patch size {v.patch_size}")
    if v.mask not in MASK_STRATEGIES:
        raise ValueError(f"unknown image mask {v.mask!r}; expected one of {', '.join(MASK_STRATEGIES)}")
    if not 0.0 <= v.mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {v.mask_ratio}")
    if v.pool not in ("cls", "gap_cls", "gap") or v.pos_embed not in POS_EMBEDS:
        raise ValueError(f"unknown vision pool {v.pool!r} or position embedding {v.pos_embed!r}")
    if v.pos_embed == "sincos" and v.width % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {v.width}")
    if t.context_length < 1 or t.pool not in ("eot", "last"):
        raise ValueError(f"bad text config: context length {t.context_length}, pool {t.pool!r}")
    if cfg.gelu not in ("exact", "tanh") or cfg.loss not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown GELU flavour {cfg.gelu!r} or loss {cfg.loss!r}")
    if max(v.layers, t.layers) > MAX_LAYERS:  # before the count: building 10^5 blocks takes minutes
        raise ValueError(
            f"model config asks for {v.layers} image and {t.layers} text layers (limit {MAX_LAYERS}): refused"
        )
    if v.num_patches > MAX_PATCHES or t.context_length > MAX_CONTEXT:
        raise ValueError(
            f"model config asks for {v.num_patches} image patches and {t.context_length} text "
            f"tokens (limits {MAX_PATCHES} and {MAX_CONTEXT}): refused"
        )
    n = count_parameters(cfg)
    if n > MAX_PARAMETERS:
        raise ValueError(
            f"model config asks for {n / 1e9:.3g}B parameters, over the limit of "
            f"{MAX_PARAMETERS / 1e9:.3g}B (4x the largest registered model): refused"
        )
    return cfg


# What a config (from a name, a flag or a file's header) may ask for, checked before allocating.
MAX_PARAMETERS = 4 * max(count_parameters(c) for c in MODEL_CONFIGS.values())
MAX_LAYERS = 4 * max(max(c.vision.layers, c.text.layers) for c in MODEL_CONFIGS.values())
MAX_PATCHES = 128 * 128
MAX_CONTEXT = 4096


# ----------------------------------------------------------------------------- model

LN_EPS = 1e-5  # OpenCLIP and the authors' clipa_torch both use torch's default LayerNorm eps
MASK_STRATEGIES = ("none", "random", "grid", "block")
POS_EMBEDS = ("learnable", "sincos")


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table [1 + grid*grid, width] (MAE / OpenCLIP order: first half encodes the
    column, second half the row; each half is [sin, cos]); the CLS row is zero."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """Patches kept by masking: int(N * (1 - p)), at least one (all N at ratio 0). Static, so XLA
    compiles one graph."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def _bayer(size: int) -> torch.Tensor:
    """Ordered-dither (Bayer) matrix [size, size] with values 0..size^2-1: the first size^2/4 values
    form a stride-2 sub-grid, the first half a checkerboard, and so on - a regular pattern for any
    keep fraction."""
    m = torch.zeros(1, 1, dtype=torch.long)
    base = torch.tensor([[0, 2], [3, 1]])
    while m.shape[0] < size:
        n = m.shape[0]
        # finest 2x2 position decides the high digits, the coarser position the low ones
        m = (n * n) * base.repeat(n, n) + m.repeat_interleave(2, 0).repeat_interleave(2, 1)
    return m


def mask_indices(batch: int, grid: int, strategy: str, mask_ratio: float, device) -> torch.Tensor:
    """Indices [batch, K] of the patch tokens to keep (K = keep_count), drawn on `device`.

    random: a uniform random subset per sample (FLIP).
    grid:   a regular sub-grid (one patch of each 2x2 cell at 75%, a checkerboard at 50%), at a random
            offset per sample.
    block:  square blocks of patches dropped one after another (BEiT style) until the ratio is met; the
            last block is cut to hit the exact count.
    All random numbers come from torch.rand/randint on the device: no host RNG, no sync."""
    n = grid * grid
    k = keep_count(n, mask_ratio)
    if strategy == "random":
        score = torch.rand(batch, n, device=device)
    elif strategy == "grid":
        tile = 8
        pattern = _bayer(tile).to(device)  # [8, 8]
        offset = torch.randint(0, tile, (batch, 2), device=device)
        r = torch.arange(grid, device=device)
        rows = (r[None, :, None] + offset[:, 0, None, None]) % tile  # [B, g, 1]
        cols = (r[None, None, :] + offset[:, 1, None, None]) % tile  # [B, 1, g]
        rank = pattern[rows, cols].reshape(batch, n)  # lower = kept first
        score = -(rank * n + torch.arange(n, device=device)).float()  # ties: raster order
    elif strategy == "block":
        drop = n - k
        max_side = max(1, grid // 2)
        mean_area = sum(s * s for s in range(1, max_side + 1)) / max_side
        blocks = min(n, int(math.ceil(2.0 * drop / mean_area)) + 2)
        side = torch.randint(1, max_side + 1, (batch, blocks, 1), device=device)
        top = (torch.rand(batch, blocks, 1, device=device) * (grid - side + 1)).floor()
        left = (torch.rand(batch, blocks, 1, device=device) * (grid - side + 1)).floor()
        pos = torch.arange(n, device=device)
        py = (pos // grid)[None, None]  # [1, 1, N]
        px = (pos % grid)[None, None]  # [1, 1, N]
        inside = (py >= top) & (py < top + side) & (px >= left) & (px < left + side)  # [B, M, N]
        order = torch.arange(blocks, device=device, dtype=torch.float32)[None, :, None]
        first = torch.where(inside, order, float(blocks)).amin(dim=1)  # first block covering it
        # dropped first: patches of earlier blocks; random order inside a block and among the rest
        score = first + torch.rand(batch, n, device=device)
    else:
        raise ValueError(f"unknown mask strategy {strategy!r}")
    return score.topk(k, dim=1).indices


class Attention(nn.Module):
    """Multi-head self-attention with OpenCLIP's parameter names (in_proj_weight/bias, out_proj),
    computed by F.scaled_dot_product_attention on batch-first tensors."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False, pick=None) -> torch.Tensor:
        """pick (see Block): queries from that one row per sample only; keys and values from all."""
        b, n, d = x.shape
        head_dim = d // self.heads
        w = self.in_proj_weight
        bias = self.in_proj_bias
        mask = None
        if pick is None:
            q, k, v = F.linear(x, w, bias).chunk(3, dim=-1)  # [B, N, D] each
        else:
            q = F.linear(_rows(x, pick), w[:d], bias[:d])  # [B, 1, D]
            k, v = F.linear(x, w[d:], bias[d:]).chunk(2, dim=-1)  # [B, N, D] each
            if causal:  # the picked row sees the positions up to its own
                last = torch.as_tensor(pick, device=x.device).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
                mask = torch.arange(n, device=x.device) <= last  # [B or 1, 1, 1, N]
        q = q.reshape(b, -1, self.heads, head_dim).transpose(1, 2)  # [B, H, N or 1, Dh]
        k = k.reshape(b, n, self.heads, head_dim).transpose(1, 2)  # [B, H, N, Dh]
        v = v.reshape(b, n, self.heads, head_dim).transpose(1, 2)  # [B, H, N, Dh]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and pick is None)
        x = x.transpose(1, 2).reshape(b, -1, d)  # [B, N or 1, D]
        return self.out_proj(x)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, gelu: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=nn.GELU(approximate="tanh" if gelu == "tanh" else "none"),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False, pick=None) -> torch.Tensor:
        """pick: None, or the row the tower reads out (an int, or [B] indices): that row alone, [B, 1, W]."""
        residual = x if pick is None else _rows(x, pick)  # [B, N, W], or [B, 1, W] with a pick
        x = residual + self.attn(self.ln_1(x), causal=causal, pick=pick)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, gelu: str):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_ratio, gelu) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, pick=None) -> torch.Tensor:
        """pick: the row the tower pools (CLS, EOT), or None for all rows (GAP). With a pick the last
        block computes that row alone: the others feed nothing downstream (up to 1/layers of a tower)."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            run = functools.partial(block, causal=causal, pick=pick if i == last else None)
            if ckpt:
                x = xla_utils.grad_checkpoint(run, x)
            else:
                x = run(x)
        return x


def _rows(x: torch.Tensor, pick) -> torch.Tensor:
    """[B, N, W] -> [B, 1, W]: row `pick` (an int, or [B] indices) of each sample."""
    if isinstance(pick, int):
        return x[:, pick : pick + 1]
    return x[torch.arange(len(x), device=x.device), pick][:, None]


class VisionTransformer(nn.Module):
    """ViT with OpenCLIP's parameter names (conv1, class_embedding, positional_embedding, ln_pre,
    transformer, ln_post, proj), so an OpenCLIP `visual.*` state dict loads unchanged."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, gelu: str):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        if cfg.pos_embed == "sincos":
            # fixed: a buffer (not trained), saved so exported files carry it, recomputed for any grid
            self.register_buffer("positional_embedding", sincos_2d(w, cfg.grid))
        else:
            self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=LN_EPS) if cfg.pre_norm else None
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, gelu)
        self.ln_post = nn.LayerNorm(w, eps=LN_EPS)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))

    def forward(self, images: torch.Tensor, mask: bool = False) -> torch.Tensor:
        x = self.conv1(images)  # [B, W, g, g]
        b, w, gh, gw = x.shape
        if gh * gw + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"images of {images.shape[-2]}x{images.shape[-1]} px do not fit this model "
                f"(built for {self.cfg.image_size} px)"
            )
        pos = self.positional_embedding.to(x.dtype)
        x = x.flatten(2).transpose(1, 2) + pos[1:]  # [B, N, W]
        if mask:  # token reduction: keep a static number of patch tokens, after the position embedding
            keep = mask_indices(b, gh, self.cfg.mask, self.cfg.mask_ratio, x.device)
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, w))
        cls = (self.class_embedding.to(x.dtype) + pos[0]).expand(b, 1, w)
        x = torch.cat([cls, x], dim=1)  # CLS always kept
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.transformer(x, pick=0 if self.cfg.pool == "cls" else None)
        if self.cfg.pool == "cls":
            pooled = x[:, 0]
        elif self.cfg.pool == "gap_cls":
            pooled = x.mean(dim=1)  # v1 GAP: all tokens, CLS included
        else:
            pooled = x[:, 1:].mean(dim=1)  # v2 GAP: patch tokens only
        return self.ln_post(pooled) @ self.proj


class TextTransformer(nn.Module):
    """Text tower; parameter names as OpenCLIP's CLIP text tower (under a `text.` prefix here)."""

    def __init__(self, cfg: TextConfig, embed_dim: int, gelu: str):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, gelu)
        self.ln_final = nn.LayerNorm(w, eps=LN_EPS)
        self.text_projection = nn.Parameter(torch.empty(w, embed_dim))
        # OpenCLIP's text init (std scaled by width and depth)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = w**-0.5 * (2 * cfg.layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=w**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=w**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        if n > self.cfg.context_length:
            raise ValueError(f"{n} text tokens exceed the context length {self.cfg.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:n]  # [B, N, W]
        if self.cfg.pool == "eot":
            pick = tokens.argmax(dim=-1)  # EOT has the largest id
        else:
            pick = n - 1  # v2: the last position
        x = self.ln_final(self.transformer(x, causal=self.cfg.causal, pick=pick))  # [B, 1, W]
        return x[:, 0] @ self.text_projection


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = check_config(cfg)
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.gelu)
        self.text = TextTransformer(cfg.text, cfg.embed_dim, cfg.gelu)
        # SigLIP's initialisation for the sigmoid loss: t' = log 10, b = -10
        sigmoid = cfg.loss == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10 if sigmoid else 1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None

    def encode_image(self, images: torch.Tensor, normalize: bool = False, mask: bool | None = None):
        """images: NORMALISED float [B, 3, H, W]. mask None -> mask iff training and the config asks."""
        if mask is None:
            mask = self.training
        mask = bool(mask) and self.cfg.vision.mask != "none" and self.cfg.vision.mask_ratio > 0
        x = self.visual(images, mask=mask)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False):
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return (
            self.encode_image(images, normalize=True),
            self.encode_text(tokens, normalize=True),
            self.logit_scale.exp(),
        )

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable


def unwrap(model: nn.Module) -> nn.Module:
    """The CLIP inside a DDP wrapper (its .module), or the model itself."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- FLOPs


def _block_macs(tokens: int, width: int, mlp_ratio: float, rows: int | None = None) -> int:
    # qkv + out projections 4*L*D^2, MLP 2*L*D*H, attention 2*L^2*D; rows=1: k, v of L tokens, the rest of 1
    r = tokens if rows is None else rows
    return (2 * tokens + 2 * r) * width**2 + 2 * r * width * int(width * mlp_ratio) + 2 * r * tokens * width


def count_flops(
    cfg: CLIPConfig, image_size: int | None = None, context_length: int | None = None, mask_ratio: float = 0.0
) -> dict:
    """Forward GFLOPs per sample in the CLIPA papers' convention (1 multiply-add = 1 FLOP): matmuls of
    the patch embedding (all patches), the transformer blocks (kept patches + CLS), the projections.
    Norms, softmax, GELU and additions are not counted. executed_gflops: what runs here, where a tower
    that reads one row (CLS, EOT) runs its last block for that row alone."""
    v = cfg.vision
    t = cfg.text
    size = v.image_size if image_size is None else image_size
    ctx = t.context_length if context_length is None else context_length
    if size % v.patch_size or size <= 0:
        raise ValueError(f"image size {size} is not a positive multiple of the patch size {v.patch_size}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    if ctx <= 0:
        raise ValueError(f"context length must be positive, got {ctx}")
    n = (size // v.patch_size) ** 2
    kept = keep_count(n, mask_ratio)
    image = (
        n * 3 * v.patch_size**2 * v.width
        + v.layers * _block_macs(kept + 1, v.width, v.mlp_ratio)
        + v.width * cfg.embed_dim
    )
    text = t.layers * _block_macs(ctx, t.width, t.mlp_ratio) + t.width * cfg.embed_dim
    # a tower that reads one row runs its last block for that row alone
    saved = _block_macs(ctx, t.width, t.mlp_ratio) - _block_macs(ctx, t.width, t.mlp_ratio, rows=1)
    if v.pool == "cls":
        saved += _block_macs(kept + 1, v.width, v.mlp_ratio) - _block_macs(kept + 1, v.width, v.mlp_ratio, rows=1)
    return {
        "image_gflops": image / 1e9,
        "text_gflops": text / 1e9,
        "total_gflops": (image + text) / 1e9,
        "executed_gflops": (image + text - saved) / 1e9,
        "image_size": size,
        "context_length": ctx,
        "mask_ratio": mask_ratio,
        "patches": n,
        "patches_kept": kept,
    }


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="model.py", description="CLIPA models: the registry and a FLOPs counter")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registry names and aliases")
    f = sub.add_parser("flops", help="forward GFLOPs per sample (1 multiply-add = 1 FLOP)")
    f.add_argument("name")
    f.add_argument("--image-size", type=int)
    f.add_argument("--context-length", type=int)
    f.add_argument("--mask-ratio", type=float, default=0.0)
    f.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    if args.cmd == "list":
        aliases = [f"{alias} -> {target}" for alias, (target, _) in MODEL_ALIASES.items()]
        print("\n".join(list_models() + aliases))
        return 0
    try:
        r = count_flops(get_model_config(args.name), args.image_size, args.context_length, args.mask_ratio)
    except ValueError as err:
        return cli.usage_error(err)
    if args.json:
        print(json.dumps({k: r[k] for k in ("image_gflops", "text_gflops", "total_gflops", "executed_gflops")}))
    else:
        print(
            f"{args.name} @ {r['image_size']} px ({r['patches_kept']} of {r['patches']} patches "
            f"kept), {r['context_length']} text tokens: image {r['image_gflops']:.2f} G, "
            f"text {r['text_gflops']:.2f} G, total {r['total_gflops']:.2f} GFLOPs "
            "(forward, per sample, 1 multiply-add = 1 FLOP)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
