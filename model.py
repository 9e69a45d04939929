"""CLIPA models: ViT image tower + transformer text tower with image/text token reduction.

One registry (MODEL_CONFIGS) holds every architecture of the CLIPA papers. v1 models are
OpenCLIP-compatible CLIP; v2 "BigVision" models were converted from the authors' JAX code.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

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
    pool: str = "cls"           # "cls" | "gap_cls" (v1 GAP: mean incl. CLS) | "gap" (v2: patches only)
    pre_norm: bool = True       # ln_pre before the blocks (v1 yes, v2 no)
    pos_embed: str = "learnable"  # "learnable" | "sincos" (fixed 2-D, used in pre-training)
    mask: str = "none"          # image token reduction by masking: "none" | "random" | "grid" | "block"
    mask_ratio: float = 0.0     # fraction of patch tokens dropped when masking

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
    causal: bool = True         # v1: causal mask; v2: bidirectional
    pool: str = "eot"           # "eot" (position of the largest id, v1) | "last" (index -1, v2)
    tokenizer: str = "clip_bpe"   # "clip_bpe" (v1) | "wordpiece" (v2, bert-base-uncased)
    reduction: str = "truncate"   # training-time text reduction: truncate | random | block | syntax


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    gelu: str = "exact"         # "exact" | "tanh"
    family: str = "v1"          # "v1" (OpenCLIP layout, OpenAI mean/std) | "v2" (BigVision)

    # evaluation preprocessing defaults of the family (CLIPA_SPEC section 3)
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


def _v1(embed, vw, vl, vh, patch, pool, ctx, tw, tl, th, reduction):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(patch_size=patch, width=vw, layers=vl, heads=vh, pool=pool),
        text=TextConfig(context_length=ctx, width=tw, layers=tl, heads=th, reduction=reduction),
    )


def _v2(embed, vw, vl, vh, tw, tl, th, mlp=4.0, gelu="tanh", image_size=224):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=image_size, patch_size=14, width=vw, layers=vl, heads=vh,
                            mlp_ratio=mlp, pool="gap", pre_norm=False),
        text=TextConfig(context_length=32, vocab_size=32000, width=tw, layers=tl, heads=th,
                        causal=False, pool="last", tokenizer="wordpiece"),
        gelu=gelu, family="v2",
    )


MODEL_CONFIGS: dict[str, CLIPConfig] = {
    # v1 (CLIPA_SPEC section 3)
    "ViT-B-16-CL16": _v1(512, 768, 12, 12, 16, "cls", 16, 512, 12, 8, "truncate"),
    "ViT-L-16-CL16-Syntax-GAP": _v1(768, 1024, 24, 16, 16, "gap_cls", 16, 768, 12, 12, "syntax"),
    "ViT-L-16-CL8-Syntax-GAP": _v1(768, 1024, 24, 16, 16, "gap_cls", 8, 768, 12, 12, "syntax"),
    "ViT-L-16-CL16-GAP": _v1(768, 1024, 24, 16, 16, "gap_cls", 16, 768, 12, 12, "truncate"),
    "ViT-L-16-CL32-GAP": _v1(768, 1024, 24, 16, 16, "gap_cls", 32, 768, 12, 12, "truncate"),
    "ViT-H-14-CL8-Syntax-GAP": _v1(1024, 1280, 32, 16, 14, "gap_cls", 8, 1024, 24, 16, "syntax"),
    "ViT-H-14-CL32-GAP": _v1(1024, 1280, 32, 16, 14, "gap_cls", 32, 1024, 24, 16, "truncate"),
    # v2 "BigVision" (converted from JAX; OpenCLIP's ViT-{L,H,bigG}-14-CLIPA)
    "ViT-L-14-CL32-GAP-BigVision": _v2(768, 1024, 24, 16, 768, 12, 12),
    "ViT-H-14-CL32-GAP-BigVision": _v2(1024, 1280, 32, 16, 1024, 24, 16),
    "ViT-bigG-14-CL32-GAP-BigVision": _v2(1280, 1664, 48, 16, 1280, 32, 20, mlp=4.9231),
    # tiny models for tests and the CPU demo (same code paths, few parameters)
    "ViT-Tiny-8-CL16-Syntax-GAP": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, pool="gap_cls"),
        text=TextConfig(context_length=16, width=128, layers=4, heads=4, reduction="syntax")),
    "ViT-Tiny-8-CL32-GAP": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, pool="gap_cls"),
        text=TextConfig(context_length=32, width=128, layers=4, heads=4)),
    "ViT-Test-8-CL16": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(context_length=16, width=32, layers=2, heads=2)),
    "ViT-Test-8-CL32-GAP-BigVision": replace(
        _v2(32, 32, 2, 2, 32, 2, 2), vision=replace(_v2(32, 32, 2, 2, 32, 2, 2).vision,
                                                     image_size=32, patch_size=8)),
}

# Names used elsewhere for the same architectures: the reference scripts' misspellings
# (CLIPA_SPEC section 8) and OpenCLIP's names for the converted v2 models.
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


def get_model_config(name: str, image_size: int | None = None, context_length: int | None = None,
                     pos_embed: str | None = None, mask: str | None = None,
                     mask_ratio: float | None = None) -> CLIPConfig:
    """Resolve a model name (or alias) to its config, with optional build-time overrides.

    image_size is CLIPA's "resize" image token reduction (force_image_size)."""
    if name in MODEL_ALIASES:
        base, vision_over = MODEL_ALIASES[name]
        cfg = MODEL_CONFIGS[base]
        cfg = replace(cfg, vision=replace(cfg.vision, **vision_over))
    elif name in MODEL_CONFIGS:
        cfg = MODEL_CONFIGS[name]
    else:
        close = difflib.get_close_matches(name, list(MODEL_CONFIGS) + list(MODEL_ALIASES), n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}" if close else f"; known: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    v = {k: val for k, val in dict(image_size=image_size, pos_embed=pos_embed, mask=mask,
                                   mask_ratio=mask_ratio).items() if val is not None}
    t = {"context_length": context_length} if context_length is not None else {}
    return replace(cfg, vision=replace(cfg.vision, **v), text=replace(cfg.text, **t))
