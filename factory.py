"""Models from names and weights files: what a user of trained CLIPA weights calls.

- create_model(name or config, pretrained=PATH): the architecture from the registry (model.py), or from
  the config our checkpoints record in their safetensors header, with the weights loaded;
- the checkpoint layouts: ours (the text tower under `text.`), OpenCLIP's CLIP (text tower at the top
  level, v1 with ln_pre, v2 without) and the authors' converted BigVision files; position tables are
  resized to the model's image grid and context length on load;
- weights files: our safetensors files (header metadata: model name and config), torch state dicts
  read with weights_only=True, and a check that a file holds exactly a config's tensors;
- get_tokenizer(name) and create_model_and_transforms(name), as OpenCLIP offers them.

The towers themselves, the registry and the FLOPs counter are in model.py.

CLI: python factory.py tokenize [--model NAME] [--context-length N] [--reduction R] TEXT...
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

import checkpoints
import cli
import tokenizer
import transforms
from model import CLIP, CLIPConfig, TextConfig, VisionConfig, check_config, get_model_config, sincos_2d, with_overrides

# ----------------------------------------------------------------------------- weights files


def weights_metadata(model_name: str, cfg: CLIPConfig) -> dict[str, str]:
    """safetensors header metadata of our weights files (all values str)."""
    return {"format": "clipa", "model_name": str(model_name), "model_config": json.dumps(dataclasses.asdict(cfg))}


def config_from_metadata(meta: dict | None) -> CLIPConfig | None:
    """The CLIPConfig stored by weights_metadata, or None when the file carries none."""
    if not meta or meta.get("format") != "clipa" or "model_config" not in meta:
        return None
    try:
        d = json.loads(meta["model_config"])
        cfg = CLIPConfig(**{**d, "vision": VisionConfig(**d["vision"]), "text": TextConfig(**d["text"])})
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"weights metadata holds an unreadable model config ({e})") from None
    try:
        return check_config(cfg)  # bounded before anything is built: the header may be crafted
    except ValueError as e:
        raise ValueError(f"the checkpoint's model config is refused: {e}") from None


def _weights_file(path) -> str:
    """The weights file of a checkpoint path (file, checkpoint dir, run dir, checkpoints dir; a URL on
    s3://, gs:// or http(s)://: downloaded once per process, to a local file)."""
    path = checkpoints.resolve_checkpoint(path, weights_only=True)
    if os.path.isdir(path):
        return os.path.join(path, "model.safetensors")
    return path


def _safetensors_header(file: str) -> dict | None:
    """The JSON header of a safetensors file (an 8-byte little-endian length, then JSON), read
    without touching the tensor bytes; None when the file is not a safetensors file."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n) if 0 < n <= 100 * 2**20 else b""  # safetensors caps headers at 100 MB
    if not raw.startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def read_metadata(path) -> dict[str, str]:
    """A checkpoint's metadata without reading its weights: the safetensors header's __metadata__
    (weights_metadata for ours); {} for a torch file, which records none."""
    file = _weights_file(path)
    header = _safetensors_header(file)
    if header is None:
        if file.endswith(".safetensors"):
            raise ValueError(f"{file} is not a readable safetensors file (no JSON header)")
        return {}
    return dict(header.get("__metadata__") or {})


def check_weights_fit(path, cfg: CLIPConfig) -> None:
    """Our weights file at `path` holds exactly the tensors of `cfg`, names and shapes (from the
    safetensors header: nothing is read or allocated). Resuming needs this: no conversion, no resize."""
    header = _safetensors_header(_weights_file(path)) or {}
    try:
        got = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (TypeError, KeyError):
        got = {}
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in CLIP(cfg).state_dict().items()}
    bad = sorted(set(want) ^ set(got)) + [k for k in want if k in got and want[k] != got[k]]
    if bad:
        raise ValueError(
            f"{os.fspath(path)} does not hold weights of this model at these settings "
            f"({len(bad)} tensors differ, e.g. {bad[0]})"
        )


def read_weights(path) -> dict[str, torch.Tensor]:
    """The state dict of our checkpoint dir / .safetensors file / a torch state-dict file.

    Torch files are read with weights_only=True (never unpickle arbitrary objects); OpenCLIP training
    checkpoints wrap the weights in {"state_dict": ...} with DDP's "module." prefixes."""
    file = _weights_file(path)
    if file.endswith(".safetensors") or _safetensors_header(file) is not None:
        try:
            return load_file(file)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({cli.first_line(e)})") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of all kinds: not a (safe) checkpoint
        raise ValueError(
            f"{file} is not a torch checkpoint readable with weights_only=True ({cli.first_line(e, 200)})"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file} holds no state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


# ----------------------------------------------------------------------------- layouts

# OpenCLIP's CLIP class (and the authors' clipa_torch, which the converted CLIPA-v2 weights were
# written for) keep the text tower at the top level; here it lives under `text.`.
_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def detect_layout(sd: dict) -> str:
    """'clipa' (ours, = OpenCLIP CustomTextCLIP names), 'openclip-v1' (OpenCLIP CLIP with ln_pre),
    'openclip-v2' (no ln_pre: OpenCLIP ViT-*-14-CLIPA and the authors' converted BigVision files)."""
    if "text.token_embedding.weight" in sd:
        return "clipa"
    if "token_embedding.weight" in sd:
        return "openclip-v1" if "visual.ln_pre.weight" in sd else "openclip-v2"
    raise ValueError(f"not a CLIP state dict: no text token embedding (first keys: {', '.join(list(sd)[:4])})")


def to_clipa_keys(sd: dict) -> dict:
    """OpenCLIP CLIP names -> ours (a state dict in our names comes back as a copy)."""
    if detect_layout(sd) == "clipa":
        return dict(sd)
    return {("text." + k if k.startswith(_TEXT_TOP_LEVEL) else k): v for k, v in sd.items()}


def to_openclip_keys(sd: dict) -> dict:
    """Our names -> OpenCLIP CLIP names (the inverse key map)."""
    return {k.removeprefix("text."): v for k, v in sd.items()}


def resize_image_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g0*g0, W] -> [1 + grid*grid, W]: CLS row kept, the patch grid resized bicubic with
    antialiasing (OpenCLIP's rule, so both libraries give the same table)."""
    old = int(round(math.sqrt(table.shape[0] - 1)))
    if old * old + 1 != table.shape[0]:
        raise ValueError(f"image position table of {table.shape[0]} rows is not 1 + a square grid")
    if old == grid:
        return table
    patches = table[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, W, g0, g0]
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)  # [grid*grid, W]
    return torch.cat([table[:1], patches])


def resize_text_pos_embed(table: torch.Tensor, length: int) -> torch.Tensor:
    """[T0, W] -> [length, W], linear (OpenCLIP's rule)."""
    if table.shape[0] == length:
        return table
    x = F.interpolate(table.float().T[None], size=length, mode="linear", align_corners=False)  # [1, W, length]
    return x[0].T.to(table.dtype).contiguous()


# ----------------------------------------------------------------------------- loading


class NonFiniteWeightsWarning(UserWarning):
    """Loaded weights hold NaN or Inf values (the model's outputs will be meaningless)."""


def _few(keys: list, n=4) -> str:
    shown = ", ".join(keys[:n])
    if len(keys) > n:
        return f"{shown} (+{len(keys) - n} more)"
    return shown


def _check_finite(model: CLIP, sd: dict, source: str) -> None:
    """model.nonfinite_weights = names of the tensors with NaN/Inf values; a warning when any."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    model.nonfinite_weights = bad
    if bad:
        warnings.warn(
            f"{source} holds non-finite weights (NaN/Inf) in {len(bad)} tensors: {_few(bad, 3)}; "
            "its outputs are meaningless",
            NonFiniteWeightsWarning,
            stacklevel=3,
        )


def _resizes(sd: dict, cfg: CLIPConfig) -> list[str]:
    """What fitting the position tables of `sd` (our names) to `cfg` changes, one phrase each: a
    file evaluated at another size than it was trained at, which the caller may want to say."""
    v, notes = cfg.vision, []
    table = sd.get("visual.positional_embedding")
    if table is not None and table.ndim == 2:
        old = int(round(math.sqrt(table.shape[0] - 1)))
        if old != v.grid:
            how = "recomputed (sin-cos)" if v.pos_embed == "sincos" else "resized (bicubic)"
            notes.append(
                f"image position table {how} from {old}x{old} to {v.grid}x{v.grid} patches "
                f"({old * v.patch_size} px -> {v.image_size} px)"
            )
    table = sd.get("text.positional_embedding")
    if table is not None and table.ndim == 2 and table.shape[0] != cfg.text.context_length:
        notes.append(f"text position table resized from {table.shape[0]} to {cfg.text.context_length} tokens")
    return notes


def _fitted_state(model: CLIP, sd: dict, source: str, strict: bool = True) -> tuple[dict, str]:
    """(state dict in our names with the position tables resized to `model`, layout), checked
    against the model's keys and shapes - which a model on the meta device has without memory.
    model.resized_pos_tables: what the fitting changed (see _resizes)."""
    layout = detect_layout(sd)
    sd = to_clipa_keys(sd)
    own = model.state_dict()
    v = model.cfg.vision
    model.resized_pos_tables = _resizes(sd, model.cfg)
    if v.pos_embed == "sincos":
        sd["visual.positional_embedding"] = sincos_2d(v.width, v.grid)  # exact, never interpolated
    elif "visual.positional_embedding" in sd:
        sd["visual.positional_embedding"] = resize_image_pos_embed(sd["visual.positional_embedding"], v.grid)
    if "text.positional_embedding" in sd:
        sd["text.positional_embedding"] = resize_text_pos_embed(
            sd["text.positional_embedding"], model.cfg.text.context_length
        )
    for k in ("logit_scale", "logit_bias"):
        if k in sd and sd[k].numel() == 1 and k in own:
            sd[k] = sd[k].reshape(own[k].shape)
    if "logit_bias" not in own:  # a sigmoid-loss checkpoint into a softmax model
        sd.pop("logit_bias", None)
    elif "logit_bias" not in sd:  # ... and the reverse: SigLIP's initial bias
        sd["logit_bias"] = torch.tensor(-10.0)
    if not strict:
        return sd, layout
    missing = [k for k in own if k not in sd]  # in model order: most telling first
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if sd[k].shape != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing {_few(missing, 4)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected, 4)}")
    if shapes:
        parts.append(f"shape mismatch {_few(shapes, 2)}")
    if parts:
        raise ValueError(
            f"{source} ({layout} layout) does not fit this {model.cfg.family} architecture: {'; '.join(parts)}"
        )
    return sd, layout


def load_pretrained(model: CLIP, path, *, strict: bool = True) -> str:
    """Load weights of any supported layout into `model`, resizing position tables to its grid and
    context length (a fixed sin-cos table is recomputed, not interpolated). Returns the layout name.
    A checkpoint of another architecture is a one-line ValueError naming missing/unexpected keys."""
    source = os.fspath(path)
    sd, layout = _fitted_state(model, read_weights(path), source, strict)
    model.load_state_dict(sd, strict=strict)
    _check_finite(model, sd, source)
    return layout


def create_model(
    name_or_cfg: str | CLIPConfig | None,
    *,
    image_size: int | None = None,
    context_length: int | None = None,
    pos_embed: str | None = None,
    mask: str | None = None,
    mask_ratio: float | None = None,
    pretrained=None,
) -> CLIP:
    """Build a CLIP by registry name (or alias, or a CLIPConfig); name None takes the config stored in
    the `pretrained` weights file. Overrides apply on top (image_size is CLIPA's resize reduction)."""
    if name_or_cfg is None:
        if pretrained is None:
            raise ValueError("give a model name or a pretrained checkpoint that records its config")
        name_or_cfg = config_from_metadata(read_metadata(pretrained))
        if name_or_cfg is None:
            raise ValueError(
                f"{os.fspath(pretrained)} records no model config (not a checkpoint of this "
                "project): pass its model name (--model NAME)"
            )
    if not isinstance(name_or_cfg, CLIPConfig):
        name_or_cfg = get_model_config(name_or_cfg)
    cfg = with_overrides(
        name_or_cfg,
        image_size=image_size,
        context_length=context_length,
        pos_embed=pos_embed,
        mask=mask,
        mask_ratio=mask_ratio,
    )
    cfg = check_config(cfg)
    if pretrained is None:
        return CLIP(cfg)
    source = os.fspath(pretrained)
    sd = read_weights(pretrained)
    with torch.device("meta"):  # skip random init: every tensor is overwritten by the strict load
        model = CLIP(cfg)
    # keys and shapes checked on the meta model: memory is allocated only for weights that fit
    sd, _ = _fitted_state(model, sd, source)
    model.to_empty(device="cpu")
    model.load_state_dict(sd)
    _check_finite(model, sd, source)
    return model


def get_tokenizer(
    name_or_cfg: str | CLIPConfig, context_length: int | None = None, reduction: str | None = None
) -> tokenizer.Tokenizer:
    """The tokenizer a model (registry name, alias or CLIPConfig) implies. reduction None -> the
    model's training reduction ("syntax" for -Syntax- models); evaluation passes reduction="truncate".
    context_length None -> the model's own."""
    cfg = name_or_cfg if isinstance(name_or_cfg, CLIPConfig) else get_model_config(name_or_cfg)
    text = cfg.text
    if context_length is None:
        context_length = text.context_length
    if reduction is None:
        reduction = text.reduction
    return tokenizer.Tokenizer(text.tokenizer, context_length, reduction)


def create_model_and_transforms(
    name,
    pretrained=None,
    force_image_size=None,
    image_mean=None,
    image_std=None,
    interpolation=None,
    square_resize_only=None,
    **create_model_kwargs,
):
    """(model in eval mode, train_transform, eval_transform) as OpenCLIP offers it: each transform maps
    a PIL image to a NORMALISED float CHW tensor. Defaults come from the model family (CLIPConfig
    properties); the eval transform is eval_zeroshot's preprocessing (transforms.eval_transform)."""
    model = create_model(name, image_size=force_image_size, pretrained=pretrained, **create_model_kwargs)
    cfg = model.cfg
    size = cfg.vision.image_size
    mean = cfg.image_mean if image_mean is None else tuple(image_mean)
    std = cfg.image_std if image_std is None else tuple(image_std)
    interp = interpolation or cfg.interpolation
    square = cfg.square_resize_only if square_resize_only is None else square_resize_only
    train = transforms.Normalized(transforms.train_transform(size), mean, std)
    evaluate = transforms.Normalized(
        transforms.eval_transform(size, interpolation=interp, square_resize_only=square), mean, std
    )
    return model.eval(), train, evaluate


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="factory.py", description="CLIPA models from names and weights files")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="print the token ids (and their text) of captions, as a model reads them")
    t.add_argument("--model", default="ViT-L-16-CL8-Syntax-GAP")
    t.add_argument("--context-length", type=int)
    t.add_argument("--reduction", choices=tokenizer.REDUCTIONS, help="default: the model's training one")
    t.add_argument("texts", nargs="+")
    args = p.parse_args(argv)

    try:
        tok = get_tokenizer(args.model, args.context_length, args.reduction)
    except ValueError as err:
        return cli.usage_error(err)
    print(tok)
    for ids in tok(args.texts).tolist():
        print(ids, repr(tok.decode(ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
