"""Zero-shot image classification (ImageNet-1K and any ImageFolder set) for CLIPA models.

Classifier: for every class, the prompts (templates filled with the class name) are encoded, each
embedding L2-normalised, averaged over templates and renormalised -> one column of W [E, C].
Logits = 100 * normalised image feature @ W; we report top-1, top-5 and mean per-class recall.

Prompts are tokenized at the model's own context length WITHOUT text masking (the reference reused
the training tokenizer, so syntax-masked T8 runs were evaluated on syntax-masked 8-token prompts).
Images travel as uint8 and are normalised on the device (data.normalize).

    python eval_zeroshot.py --ckpt out/checkpoints/latest --imagenet-val /data/imagenet/val
    python eval_zeroshot.py --ckpt w.safetensors --data /data/imagenet2012 --format tfds
    python eval_zeroshot.py --ckpt w.pt --model ViT-B-16-CL16 --data pets/val --classnames pets.txt
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TEMPLATE_SETS = {"openai": "openai_templates.txt", "short": "short_templates.txt"}


# ----------------------------------------------------------------------------- class names / templates

def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"{what} file is empty: {path}")
    return lines


def load_classnames(path: str | None = None) -> list[str]:
    """One class name per line, in class-index order. None -> the 1000 ImageNet-1K names."""
    return _read_lines(path or os.path.join(ASSETS, "imagenet_classnames.txt"), "class names")


def load_templates(name_or_path: str | None = "openai") -> list[str]:
    """'openai' (the CLIP paper's 80 prompts), 'short' (7 of them) or a file, one template per line
    with '{}' where the class name goes."""
    name_or_path = name_or_path or "openai"
    if name_or_path in TEMPLATE_SETS:
        path = os.path.join(ASSETS, TEMPLATE_SETS[name_or_path])
    else:
        path = name_or_path
    templates = _read_lines(path, "templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"every template needs exactly one '{{}}' placeholder; {path} has {bad[0]!r}")
    return templates


# ----------------------------------------------------------------------------- classifier

def _unwrap(model):
    # DDP / FSDP-style wrappers keep the CLIP in .module
    return getattr(model, "module", model)


@torch.no_grad()
def build_classifier(model, tokenizer, classnames, templates, device, *, batch_size: int = 256,
                     dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Zero-shot weights W [E, C]: per class, mean of the normalised prompt embeddings, renormalised.

    Prompts run through the text tower in fixed-size batches (the last one padded by repetition) so
    an XLA device compiles the text graph once."""
    clip = _unwrap(model)
    device = torch.device(device) if device is not None else next(clip.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(prompts)
    n = tokens.shape[0]
    bs = min(batch_size, n)
    chunks = []
    for start in _progress(range(0, n, bs), progress, "text", total=math.ceil(n / bs)):
        chunk = tokens[start:start + bs]
        if chunk.shape[0] < bs:  # static shape: pad with copies of the first row
            chunk = torch.cat([chunk, chunk[:1].expand(bs - chunk.shape[0], -1)])
        with _autocast(device, dtype):
            emb = clip.encode_text(chunk.to(device), normalize=True)
        chunks.append(emb.float())  # padding rows dropped after the loop: one graph for all chunks
        _mark_step(device)
    emb = torch.cat(chunks)[:n].view(len(classnames), len(templates), -1)
    weights = F.normalize(emb.mean(dim=1), dim=-1).t().contiguous()
    _mark_step(device)  # materialise W (else it would be re-traced into the first image batch)
    return weights


# ----------------------------------------------------------------------------- evaluation

@dataclass
class Preprocess:
    """Evaluation preprocessing (defaults: the model family's, CLIPA_SPEC section 3)."""
    image_size: int
    image_mean: tuple
    image_std: tuple
    interpolation: str
    square_resize_only: bool

    @classmethod
    def for_model(cls, cfg, force_image_size=None, image_mean=None, image_std=None,
                  interpolation=None, square_resize_only=None) -> "Preprocess":
        pick = lambda v, d: d if v is None else v  # noqa: E731
        p = cls(image_size=int(pick(force_image_size, cfg.vision.image_size)),
                image_mean=tuple(float(x) for x in pick(image_mean, cfg.image_mean)),
                image_std=tuple(float(x) for x in pick(image_std, cfg.image_std)),
                interpolation=pick(interpolation, cfg.interpolation),
                square_resize_only=bool(pick(square_resize_only, cfg.square_resize_only)))
        if len(p.image_mean) != 3 or len(p.image_std) != 3:
            raise ValueError("image mean and std need 3 values (R, G, B)")
        if any(s <= 0 for s in p.image_std):
            raise ValueError(f"image std must be positive, got {p.image_std}")
        if p.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be bicubic or bilinear, got {p.interpolation!r}")
        return p


def eval_image_transform(pre: Preprocess):
    """data.py's uint8 eval transform, decoding JPEGs at full resolution: the reduced-scale (draft)
    decode that speeds up training changes pixels by ~2-3 levels on large images, and zero-shot
    numbers must match the reference preprocessing (torchvision Resize + CenterCrop on the full image)."""
    import data
    return data.EvalTransform(pre.image_size, pre.interpolation, pre.square_resize_only, draft=False)


def evaluate(model, model_cfg, data_path, *, classnames=None, templates=None, batch_size: int = 64,
             num_workers: int = 2, device=None, dtype: torch.dtype | None = None, fmt: str | None = None,
             force_image_size: int | None = None, image_mean=None, image_std=None,
             interpolation: str | None = None, square_resize_only: bool | None = None,
             tokenizer=None, model_name: str | None = None, runtime=None, rank: int | None = None,
             world_size: int | None = None, text_batch_size: int = 256, progress: bool = False,
             limit: int | None = None) -> dict:
    """Zero-shot accuracy of `model` on the classification set at `data_path`.

    classnames: list or file path; None -> the 1000 ImageNet-1K names shipped in assets/.
    templates: list, 'openai' (80, default), 'short' (7) or a file path.
    dtype: autocast dtype (None: bfloat16 on CUDA, float32 elsewhere).
    runtime: an xla_utils.Runtime (train.py passes its own): with several processes each rank
    evaluates its shard and the counts are summed; under XLA SPMD each batch is sharded over the
    mesh. None -> `device` (default: the model's), rank/world_size if given, else torch.distributed's
    if initialised (counts are summed over its process group when world_size > 1).
    tokenizer: None -> tokenizer.get_tokenizer(model_name or model_cfg, reduction="truncate").
    Returns dict(top1, top5, mean_per_class_recall, n) plus details.
    The model is put in eval mode (no image masking) and its previous mode restored afterwards."""
    import data

    clip = _unwrap(model)
    if runtime is None:
        device = torch.device(device) if device is not None else next(clip.parameters()).device
        runtime = _default_runtime(device, rank, world_size)
    device, rank, world_size = runtime.device, runtime.rank, runtime.world_size
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if runtime.spmd and batch_size % runtime.num_devices:
        raise ValueError(f"batch size {batch_size} must be a multiple of the {runtime.num_devices} "
                         "XLA devices it is sharded over")
    if isinstance(classnames, str) or classnames is None:
        classnames = load_classnames(classnames)
    if templates is None or isinstance(templates, str):
        templates = load_templates(templates)
    if tokenizer is None:
        tokenizer = _eval_tokenizer(model_name, model_cfg)
    pre = Preprocess.for_model(model_cfg, force_image_size, image_mean, image_std, interpolation,
                               square_resize_only)

    transform = eval_image_transform(pre)
    loader, classes = data.make_eval_loader(data_path, transform, batch_size, fmt=fmt,
                                            num_workers=num_workers, rank=rank, world_size=world_size)
    if len(classes) != len(classnames):
        raise ValueError(f"{data_path} has {len(classes)} classes but {len(classnames)} class names "
                         "were given (pass --classnames with one name per class, in sorted folder order)")

    was_training = clip.training
    clip.eval()
    t0 = time.time()
    try:
        weights = build_classifier(clip, tokenizer, classnames, templates, device, dtype=dtype,
                                   batch_size=text_batch_size, progress=progress and rank == 0)
        _synchronize(device)
        t1 = time.time()
        counts = _classify(clip, weights, loader, pre, runtime, dtype, batch_size,
                           len(classnames), progress and rank == 0, limit)
        _synchronize(device)
        t2 = time.time()
    finally:
        clip.train(was_training)
    if runtime.distributed and world_size > 1:  # (under SPMD the counts are already global)
        torch.distributed.all_reduce(counts)
    counts = counts.cpu().double()
    correct1, correct5, per_class_correct, per_class_total = (
        counts[0, 0].item(), counts[0, 1].item(), counts[1], counts[2])
    n = int(per_class_total.sum().item())
    if n == 0:
        raise ValueError(f"no images found in {data_path}")
    seen = per_class_total > 0
    recall = (per_class_correct[seen] / per_class_total[seen]).mean().item()
    return dict(top1=correct1 / n, top5=correct5 / n, mean_per_class_recall=recall, n=n,
                num_classes=len(classnames), num_templates=len(templates),
                context_length=int(tokenizer.context_length), classifier_seconds=round(t1 - t0, 2),
                image_seconds=round(t2 - t1, 2), images_per_second=round(n / max(t2 - t1, 1e-9), 1),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(pre).items()})


@torch.no_grad()
def _classify(clip, weights, loader, pre: Preprocess, runtime, dtype, batch_size, num_classes,
              progress, limit):
    """Hit counts as one integer tensor [3, C]: row 0 = (top-1 hits, top-5 hits, 0...), row 1 =
    per-class top-1 hits, row 2 = per-class totals (mean per-class recall uses the classes present). Batches are padded to batch_size (labels -1) so that XLA
    compiles once; counts stay on the device until the end (no per-batch host sync)."""
    import data

    device = runtime.device
    k = min(5, num_classes)
    # exact integer counts (int32 on XLA: TPUs have no fast 64-bit integers)
    counts = torch.zeros(3, num_classes, device=device,
                         dtype=torch.int32 if device.type == "xla" else torch.int64)
    classes = torch.arange(num_classes, device=device)
    _mark_step(device)  # materialise the zeros: every batch then runs the same graph
    seen = 0
    for images, labels in _progress(loader, progress, "images"):
        if limit is not None and seen >= limit:
            break
        valid = images.shape[0]
        seen += valid
        if valid < batch_size:
            images = torch.cat([images, images.new_zeros((batch_size - valid, *images.shape[1:]))])
            labels = torch.cat([labels, labels.new_full((batch_size - valid,), -1)])
        images, labels = runtime.to_device(images, labels)
        x = data.normalize(images, pre.image_mean, pre.image_std)
        with _autocast(device, dtype):
            feats = clip.encode_image(x, normalize=True)
        logits = 100.0 * F.normalize(feats.float(), dim=-1) @ weights
        topk = logits.topk(k, dim=-1).indices
        hit1 = (topk[:, 0] == labels).to(counts.dtype)
        hitk = (topk == labels[:, None]).any(dim=-1).to(counts.dtype)
        onehot = (labels[:, None] == classes[None, :]).to(counts.dtype)  # padded rows are all zero
        counts[0, 0] += hit1.sum()
        counts[0, 1] += hitk.sum()
        counts[1] += (onehot * hit1[:, None]).sum(0)
        counts[2] += onehot.sum(0)
        _mark_step(device)
    return counts


# ----------------------------------------------------------------------------- runtime helpers

def _progress(it, enabled, unit, total=None):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, unit=f" {unit} batch", file=sys.stderr, dynamic_ncols=True)


def _autocast(device, dtype):
    """Autocast to dtype (bf16 / fp16) on the device; nothing for float32 or None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _synchronize(device):
    # for honest timings: wait for queued device work
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _mark_step(device):
    if torch.device(device).type == "xla":
        import torch_xla
        torch_xla.sync()


def _default_runtime(device: torch.device, rank: int | None = None, world_size: int | None = None):
    """A Runtime describing the caller's setup: this device, the given ranks or torch.distributed's."""
    from xla_utils import Runtime
    kind = device.type if device.type in ("cuda", "xla") else "cpu"
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None or world_size is None:
        rank, world_size = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                            if initialised else (0, 1))
    if world_size > 1 and not initialised:
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed process group "
                         "(or pass runtime=) to sum the counts of the ranks")
    return Runtime(kind, device, rank=rank, world_size=world_size, distributed=world_size > 1)


def _eval_tokenizer(model_name, model_cfg):
    """The model's tokenizer at its own context length, plain truncation (prompts are never masked)."""
    import tokenizer as tok
    text = model_cfg.text
    if model_name is not None:
        try:
            return tok.get_tokenizer(model_name, context_length=text.context_length, reduction="truncate")
        except ValueError:  # a name the registry does not know: the config says all we need
            pass
    return tok.Tokenizer(text.tokenizer, text.context_length, "truncate")


# ----------------------------------------------------------------------------- CLI

def _default_out(ckpt: str, dataset: str) -> str:
    tag = os.path.basename(os.path.normpath(dataset)) or "data"
    ckpt = os.path.normpath(ckpt)
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt) or "."
    name = f"zeroshot_{tag}.json" if os.path.isdir(ckpt) else \
        f"{os.path.splitext(os.path.basename(ckpt))[0]}.zeroshot_{tag}.json"
    return os.path.join(folder if os.access(folder, os.W_OK) else os.getcwd(), name)


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot classification accuracy of a CLIPA checkpoint.")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--ckpt", help="run dir, checkpoint dir, .safetensors or torch state dict "
                   "(ours, OpenCLIP or converted CLIPA-v2)")
    w.add_argument("--random-init", action="store_true",
                   help="no weights: time the evaluation of a randomly initialised --model")
    p.add_argument("--model", help="model name (default: read from the checkpoint's metadata)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagenet-val", metavar="DIR", help="ImageNet-1K val: ImageFolder val/ or TFDS dir")
    src.add_argument("--data", metavar="DIR", help="any ImageFolder (or TFDS) classification set")
    p.add_argument("--format", choices=["imagefolder", "tfds"], default=None, help="default: detect")
    p.add_argument("--classnames", metavar="FILE", help="one class name per line, class-index order "
                   "(default: ImageNet-1K for --imagenet-val, folder names for --data)")
    p.add_argument("--templates", default="openai", help="openai (80), short (7) or FILE ('{}' = name)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--force-image-size", type=int, help="evaluate (and build the model) at this size")
    p.add_argument("--image-mean", type=float, nargs=3, metavar=("R", "G", "B"))
    p.add_argument("--image-std", type=float, nargs=3, metavar=("R", "G", "B"))
    p.add_argument("--interpolation", choices=["bicubic", "bilinear"])
    p.add_argument("--square-resize-only", action=argparse.BooleanOptionalAction, default=None,
                   help="resize to a square without cropping (v2 default) vs short side + center crop")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | xla")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--limit", type=int, help="stop after about this many images per process (quick check)")
    p.add_argument("--out", metavar="FILE", help="JSON result (default: next to the checkpoint, else cwd)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_checkpoint_model(ckpt: str, model_name: str | None = None, image_size: int | None = None):
    """(model, cfg, name) from a checkpoint; the architecture comes from its metadata unless named.
    image_size (--force-image-size) builds the model at that size (position table resized)."""
    import model as M

    if model_name is not None:
        net = M.create_model(model_name, image_size=image_size, pretrained=ckpt)
        return net, net.cfg, model_name
    _, meta = M.read_weights(ckpt)
    cfg = M.config_from_metadata(meta)
    if cfg is None:
        raise ValueError(f"{ckpt} records no model config (not a checkpoint of this project): pass "
                         f"--model NAME, one of {', '.join(M.list_models())}")
    net = M.create_model(cfg, image_size=image_size)
    M.load_pretrained(net, ckpt)
    return net, net.cfg, meta.get("model_name") or "checkpoint"


def main(argv=None) -> int:
    args = _parse_args(argv)
    started = []  # the runtime _main starts: shut down however it ends (torchrun process group)
    try:
        return _main(args, started)
    finally:
        for runtime in started:
            runtime.shutdown()


def _main(args, started: list) -> int:
    rank = 0
    try:
        import xla_utils
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        dataset = args.imagenet_val or args.data
        if not os.path.exists(dataset):
            raise FileNotFoundError(f"dataset not found: {dataset}")
        templates = load_templates(args.templates)
        classnames = load_classnames(args.classnames) if (args.classnames or args.imagenet_val) else None
        dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
        runtime = xla_utils.init_runtime(args.device)
        started.append(runtime)
        rank = runtime.rank
        if args.random_init:
            if args.model is None:
                raise ValueError("--random-init needs --model NAME")
            import model as M
            with torch.device(runtime.device if runtime.kind == "cuda" else "cpu"):
                net = M.create_model(args.model, image_size=args.force_image_size)
            cfg, name = net.cfg, args.model
        else:
            net, cfg, name = load_checkpoint_model(args.ckpt, args.model, args.force_image_size)
        net.to(runtime.device)
        if classnames is None:  # --data without --classnames: the folder (synset) names
            import data
            _, classes = data.make_eval_loader(dataset, lambda x: x, 1, fmt=args.format, num_workers=0)
            classnames = [c.replace("_", " ") for c in classes]
        if rank == 0:
            print(f"{runtime.describe()}; model {name} at {cfg.vision.image_size}px; prompts tokenized "
                  f"at context length {cfg.text.context_length} (truncation, no masking); "
                  f"{len(classnames)} classes x {len(templates)} templates", file=sys.stderr)
        res = evaluate(net, cfg, dataset, classnames=classnames, templates=templates,
                       batch_size=args.batch_size, num_workers=args.workers, dtype=dtype,
                       fmt=args.format, image_mean=args.image_mean, image_std=args.image_std,
                       interpolation=args.interpolation, square_resize_only=args.square_resize_only,
                       model_name=name, runtime=runtime, progress=not args.no_progress,
                       limit=args.limit)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    precision = args.precision if args.precision != "auto" else \
        ("bf16" if runtime.kind == "cuda" else "fp32")
    ckpt = os.path.abspath(args.ckpt) if args.ckpt else "random-init"
    res = dict(model=name, checkpoint=ckpt, dataset=os.path.abspath(dataset),
               device=runtime.kind, precision=precision, **res)
    print(f"top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
          f"mean per-class recall {100 * res['mean_per_class_recall']:.2f}%  ({res['n']} images, "
          f"{res['num_classes']} classes, context length {res['context_length']})")
    out = args.out or _default_out(args.ckpt or os.path.join(os.getcwd(), name), dataset)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
