"""Zero-shot image classification (ImageNet-1K and any ImageFolder set) and image-text retrieval
(recall@1/5/10 on COCO / Flickr-style captioned sets) for CLIPA models.

Classifier: for every class, the prompts (templates filled with the class name) are encoded, each
embedding L2-normalised, averaged over templates and renormalised -> one column of W [E, C].
Logits = 100 * normalised image feature @ W; we report top-1, top-5 and mean per-class recall.

Prompts are tokenized at the model's own context length WITHOUT text masking (the reference reused
the training tokenizer, so syntax-masked T8 runs were evaluated on syntax-masked 8-token prompts).
Images travel as uint8 and are normalised on the device (transforms.normalize).

    python eval_zeroshot.py --ckpt out/checkpoints/latest --imagenet-val /data/imagenet/val
    python eval_zeroshot.py --ckpt w.safetensors --data /data/imagenet2012 --format tfds
    python eval_zeroshot.py --ckpt w.pt --model ViT-B-16-CL16 --data pets/val --classnames pets.txt
    python eval_zeroshot.py --ckpt out/checkpoints/latest --retrieval /data/clip_benchmark/flickr30k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import checkpoints
import cli
import data
import storage
import transforms
import xla_utils
from factory import NonFiniteWeightsWarning, config_from_metadata, create_model, get_tokenizer, read_metadata
from model import unwrap

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TEMPLATE_SETS = {"openai": "openai_templates.txt", "short": "short_templates.txt"}
MAX_TEXT_BYTES = 64 << 20  # a class-name, template or caption annotation file (COCO's captions: ~20 MB)


# ----------------------------------------------------------------------------- class names / templates


def _read_lines(path: str, what: str) -> list[str]:
    if not storage.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [line for line in storage.read_text(path, MAX_TEXT_BYTES).splitlines() if line.strip()]
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
    path = name_or_path
    if name_or_path in TEMPLATE_SETS:
        path = os.path.join(ASSETS, TEMPLATE_SETS[name_or_path])
    templates = _read_lines(path, "templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"every template needs exactly one '{{}}' placeholder; {path} has {bad[0]!r}")
    return templates


def eval_classes(data_path, fmt: str | None = None, split: str | None = None) -> list[str]:
    """Class folder names (ImageFolder) or ClassLabel names (TFDS, split None: 'validation' or its
    only split) of an evaluation set, in label order. Lists the folders / reads the TFDS info; no
    image is read."""
    return data.make_eval_loader(data_path, None, 1, fmt=fmt, num_workers=0, split=split)[1]


def check_eval_set(data_path, classnames: list[str], fmt: str | None = None, split: str | None = None) -> None:
    """One-line ValueError unless the set at data_path has one class per name. Cheap (no image is
    read), so a training run checks its eval set before its first step, not after a stage."""
    _check_class_count(data_path, eval_classes(data_path, fmt, split), classnames)


def _check_class_count(data_path, classes: list[str], classnames: list[str]):
    if len(classes) != len(classnames):
        raise ValueError(
            f"{data_path} has {len(classes)} classes but {len(classnames)} class names "
            "were given (pass --classnames with one name per class, in sorted folder order)"
        )


# ----------------------------------------------------------------------------- classifier


@torch.no_grad()
def build_classifier(
    model,
    tokenizer,
    classnames,
    templates,
    *,
    runtime: xla_utils.Runtime,
    precision: str = "auto",
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Zero-shot weights W [E, C] on runtime.device: per class, mean of the normalised prompt
    embeddings, renormalised. precision: 'auto' | 'fp32' | 'bf16' (runtime.precision decides auto).

    Prompts run through the text tower in fixed-size batches (the last one padded by repetition) so
    an XLA device compiles the text graph once."""
    clip = unwrap(model)
    precision = runtime.precision(precision)
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(prompts)
    n = tokens.shape[0]
    bs = min(batch_size, n)
    chunks = []
    for start in _progress(range(0, n, bs), progress, "text", total=math.ceil(n / bs)):
        chunk = tokens[start : start + bs]
        if chunk.shape[0] < bs:  # static shape: pad with copies of the first row
            chunk = torch.cat([chunk, chunk[:1].expand(bs - chunk.shape[0], -1)])
        with runtime.autocast(precision):
            emb = clip.encode_text(chunk.to(runtime.device), normalize=True)
        chunks.append(emb.float())  # padding rows dropped after the loop: one graph for all chunks
        runtime.step_boundary()
    emb = torch.cat(chunks)[:n].view(len(classnames), len(templates), -1)
    weights = F.normalize(emb.mean(dim=1), dim=-1).t().contiguous()
    runtime.step_boundary()  # materialise W (else it would be re-traced into the first image batch)
    return weights


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Preprocess:
    """Evaluation preprocessing (defaults: the model family's, docs/models.md)."""

    image_size: int
    image_mean: tuple
    image_std: tuple
    interpolation: str
    square_resize_only: bool

    @classmethod
    def for_model(
        cls, cfg, force_image_size=None, image_mean=None, image_std=None, interpolation=None, square_resize_only=None
    ) -> Preprocess:
        pick = lambda v, d: d if v is None else v  # noqa: E731
        p = cls(
            image_size=int(pick(force_image_size, cfg.vision.image_size)),
            image_mean=tuple(float(x) for x in pick(image_mean, cfg.image_mean)),
            image_std=tuple(float(x) for x in pick(image_std, cfg.image_std)),
            interpolation=pick(interpolation, cfg.interpolation),
            square_resize_only=bool(pick(square_resize_only, cfg.square_resize_only)),
        )
        if len(p.image_mean) != 3 or len(p.image_std) != 3:
            raise ValueError("image mean and std need 3 values (R, G, B)")
        if any(s <= 0 for s in p.image_std):
            raise ValueError(f"image std must be positive, got {p.image_std}")
        if p.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be bicubic or bilinear, got {p.interpolation!r}")
        return p

    def transform(self):
        """The uint8 image transform: transforms.eval_transform, the one create_model_and_transforms uses."""
        return transforms.eval_transform(self.image_size, self.interpolation, self.square_resize_only)


def evaluate(
    model,
    model_cfg,
    data_path,
    *,
    runtime: xla_utils.Runtime,
    precision: str = "auto",
    classnames=None,
    templates=None,
    batch_size: int = 64,
    num_workers: int = 2,
    fmt: str | None = None,
    split: str | None = None,
    preprocess: Preprocess | None = None,
    tokenizer=None,
    text_batch_size: int = 256,
    progress: bool = False,
    limit: int | None = None,
) -> dict:
    """Zero-shot accuracy of `model` (on runtime.device) on the classification set at `data_path`.

    runtime: the xla_utils.Runtime the model runs under (train.py passes its own). With several
    processes each rank evaluates its shard and the counts are summed; under XLA SPMD each batch is
    sharded over the mesh.
    precision: 'auto' | 'fp32' | 'bf16' autocast (runtime.precision decides auto).
    classnames: list or file path; None -> the 1000 ImageNet-1K names shipped in assets/.
    templates: list, 'openai' (80, default), 'short' (7) or a file path.
    split: TFDS split (None: 'validation', else the dataset's only split).
    preprocess: None -> the model family's (Preprocess.for_model(model_cfg)).
    tokenizer: None -> the model's tokenizer at its context length, plain truncation.
    Returns dict(top1, top5, mean_per_class_recall, n, skipped = undecodable images) plus details.
    The model is put in eval mode (no image masking) and its previous mode restored afterwards."""
    clip = unwrap(model)
    precision = runtime.precision(precision)
    if runtime.spmd and batch_size % runtime.num_devices:
        raise ValueError(
            f"batch size {batch_size} must be a multiple of the {runtime.num_devices} XLA devices it is sharded over"
        )
    if isinstance(classnames, str) or classnames is None:
        classnames = load_classnames(classnames)
    if templates is None or isinstance(templates, str):
        templates = load_templates(templates)
    if tokenizer is None:
        tokenizer = get_tokenizer(model_cfg, reduction="truncate")
    pre = preprocess or Preprocess.for_model(model_cfg)
    loader, classes = data.make_eval_loader(
        data_path,
        pre.transform(),
        batch_size,
        fmt=fmt,
        num_workers=num_workers,
        rank=runtime.rank,
        world_size=runtime.world_size,
        split=split,
    )
    _check_class_count(data_path, classes, classnames)

    was_training = clip.training
    clip.eval()
    progress = progress and runtime.is_master
    t0 = time.time()
    try:
        weights = build_classifier(
            clip,
            tokenizer,
            classnames,
            templates,
            runtime=runtime,
            precision=precision,
            batch_size=text_batch_size,
            progress=progress,
        )
        runtime.synchronize()
        t1 = time.time()
        counts = _classify(clip, weights, loader, pre, runtime, precision, batch_size, len(classnames), progress, limit)
        runtime.synchronize()
        t2 = time.time()
    finally:
        clip.train(was_training)
    if runtime.distributed and runtime.world_size > 1:  # (under SPMD the counts are already global)
        torch.distributed.all_reduce(counts)
    skipped = sum(runtime.all_gather_object(int(getattr(loader, "skipped", 0))))
    counts = counts.cpu().double()
    correct1, correct5, per_class_correct, per_class_total = (
        counts[0, 0].item(),
        counts[0, 1].item(),
        counts[1],
        counts[2],
    )
    n = int(per_class_total.sum().item())
    if n == 0:
        raise ValueError(f"no readable images in {data_path}")
    seen = per_class_total > 0
    recall = (per_class_correct[seen] / per_class_total[seen]).mean().item()
    return dict(
        top1=correct1 / n,
        top5=correct5 / n,
        mean_per_class_recall=recall,
        n=n,
        skipped=skipped,
        num_classes=len(classnames),
        num_templates=len(templates),
        precision=precision,
        context_length=int(tokenizer.context_length),
        classifier_seconds=round(t1 - t0, 2),
        image_seconds=round(t2 - t1, 2),
        images_per_second=round(n / max(t2 - t1, 1e-9), 1),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(pre).items()},
    )


@torch.no_grad()
def _classify(clip, weights, loader, pre: Preprocess, runtime, precision, batch_size, num_classes, progress, limit):
    """Hit counts as one integer tensor [3, C]: row 0 = (top-1 hits, top-5 hits, 0...), row 1 =
    per-class top-1 hits, row 2 = per-class totals (mean per-class recall uses the classes present).
    Batches are padded to batch_size (labels -1) so that XLA compiles once; counts stay on the
    device until the end (no per-batch host sync)."""
    device = runtime.device
    k = min(5, num_classes)
    counts = torch.zeros(3, num_classes, device=device, dtype=runtime.count_dtype)
    classes = torch.arange(num_classes, device=device)
    runtime.step_boundary()  # materialise the zeros: every batch then runs the same graph
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
        x = transforms.normalize(images, pre.image_mean, pre.image_std)
        with runtime.autocast(precision):
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
        runtime.step_boundary()
    return counts


# ----------------------------------------------------------------------------- retrieval

RECALL_K = (1, 5, 10)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class CaptionSet:
    """A retrieval set: (image file, captions) items, or shards whose records carry an image and
    a text (captions one per line). layout names where it came from."""

    layout: str
    items: list | None = None
    source: object = None  # a data.Source for shard layouts


def _flickr_items(ann: str, image_dir: str) -> list:
    """CLIP_benchmark's Flickr annotation file: a header line, then IMAGE.jpg,caption per line."""
    by_image: dict[str, list[str]] = {}
    for line in storage.read_text(ann, MAX_TEXT_BYTES).splitlines()[1:]:
        line = line.strip()
        if not line:
            continue
        image, sep, caption = line.partition(".jpg,")
        if not sep:
            raise ValueError(f"{ann}: line {line[:60]!r} is not IMAGE.jpg,caption")
        by_image.setdefault(image + ".jpg", []).append(caption)
    if not by_image:
        raise ValueError(f"{ann} holds no captions (expected a header line, then IMAGE.jpg,caption lines)")
    return [(os.path.join(image_dir, k), v) for k, v in by_image.items()]


def _coco_items(ann: str, image_dir: str) -> list:
    """A COCO captions file (images [{id, file_name}], annotations [{image_id, caption}]), in image
    id order as torchvision's CocoCaptions (which CLIP_benchmark uses) lists them."""
    d = json.loads(storage.read_text(ann, MAX_TEXT_BYTES))
    try:
        names = {im["id"]: im["file_name"] for im in d["images"]}
        caps: dict = {i: [] for i in names}
        for a in d["annotations"]:
            caps[a["image_id"]].append(a["caption"].strip())
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ann} is not a COCO captions file ({type(e).__name__}: {e})") from None
    if not names:
        raise ValueError(f"{ann} lists no images")
    return [(os.path.join(image_dir, names[i]), caps[i]) for i in sorted(names)]


def load_caption_set(path: str) -> CaptionSet:
    """Resolve --retrieval DATA. Layouts (the first that matches):
    DIR/test/nshards.txt              CLIP_benchmark webdataset (clip_benchmark_export_wds): DIR/test/0.tar ...
    DIR/coco_test_karpathy.json       CLIP_benchmark mscoco_captions root (images in DIR/val2014/)
    DIR/flickr30k_test_karpathy.txt   CLIP_benchmark flickr30k root (images in DIR/)
    FILE.json / FILE.txt              one of those annotation files (images beside it, or in val2014/)
    anything else                     shards (webdataset tars or TFRecords, as for training) whose
                                      records hold an image and a text: one caption per line"""
    path = os.fspath(path)
    if storage.isdir(path):
        nshards = os.path.join(path, "test", "nshards.txt")
        if storage.isfile(nshards):
            try:
                n = int(storage.read_text(nshards, 64).strip() or 0)
            except ValueError:
                raise ValueError(f"{nshards} holds no shard count") from None
            if n < 1:
                raise ValueError(f"{nshards} names no shards")
            spec = os.path.join(path, "test", f"{{0..{n - 1}}}.tar" if n > 1 else "0.tar")
            return CaptionSet("clip_benchmark-wds", source=data.resolve(spec))
        for name in ("coco_test_karpathy.json", "flickr30k_test_karpathy.txt"):
            if storage.isfile(os.path.join(path, name)):
                return load_caption_set(os.path.join(path, name))
    elif path.endswith(".json") and storage.isfile(path):
        d = os.path.dirname(path)
        images = os.path.join(d, "val2014")
        return CaptionSet("coco", _coco_items(path, images if storage.isdir(images) else d))
    elif path.endswith(".txt") and storage.isfile(path):
        return CaptionSet("flickr", _flickr_items(path, os.path.dirname(path)))
    return CaptionSet("shards", source=data.resolve(path))


class _CaptionedDataset(torch.utils.data.IterableDataset):
    """Batches (uint8 images [b,3,H,W] or None, captions [b lists], image ids LongTensor[b], bad) of
    this rank's part: records split over ranks x workers (whole shards when there are enough)."""

    def __init__(self, cs: CaptionSet, transform, batch_size: int, rank: int, world_size: int):
        self.cs, self.transform, self.batch_size = cs, transform, batch_size
        self.rank, self.world_size = rank, world_size

    def _records(self, g: int, n: int):
        """(id, image bytes or None, captions or None) of reader g of n; None bytes = bad record."""
        if self.cs.items is not None:
            for i in range(g, len(self.cs.items), n):
                path, caps = self.cs.items[i]
                try:
                    yield i, storage.read_bytes(path, data.MAX_RECORD_BYTES), caps
                except (OSError, ValueError):
                    yield i, None, None
            return
        shards = self.cs.source.shards
        by_shard = len(shards) >= n
        for s in range(g, len(shards), n) if by_shard else range(len(shards)):
            for r, raw in enumerate(data.read_shard(shards[s], self.cs.source)):
                if by_shard or r % n == g:
                    caps = [c.strip() for c in raw.text.splitlines() if c.strip()] if raw.reason is None else None
                    yield (s << 32) | r, raw.image if caps else None, caps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        xs, caps, ids, bad = [], [], [], 0
        for i, image, c in self._records(self.rank * nw + wid, self.world_size * nw):
            try:
                if image is None:
                    raise ValueError("bad record")
                xs.append(self.transform(image))
            except Exception:  # noqa: BLE001 - an undecodable image is skipped and counted
                bad += 1
                continue
            caps.append(list(c))
            ids.append(i)
            if len(xs) == self.batch_size:
                yield torch.stack(xs), caps, torch.tensor(ids), bad
                xs, caps, ids, bad = [], [], [], 0
        if xs or bad:
            yield (torch.stack(xs) if xs else None), caps, torch.tensor(ids, dtype=torch.long), bad


@torch.no_grad()
def _encode_texts(clip, tokens, runtime, precision, bs):
    """Normalised text features [n, E] on the host, in fixed-size batches (one graph)."""
    n = tokens.shape[0]
    out = []
    for start in range(0, n, bs):
        chunk = tokens[start : start + bs]
        if chunk.shape[0] < bs:
            chunk = torch.cat([chunk, chunk[:1].expand(bs - chunk.shape[0], -1)])
        with runtime.autocast(precision):
            emb = clip.encode_text(chunk.to(runtime.device), normalize=True)
        out.append(F.normalize(emb.float(), dim=-1))
        runtime.step_boundary()
    return torch.cat(out).cpu()[:n] if out else torch.zeros(0, clip.cfg.embed_dim)


def recall_at_k(image_feats, text_feats, text_image, ks=RECALL_K, chunk: int = 1024) -> dict:
    """CLIP-paper retrieval recall from normalised features (host tensors). image->text R@k: the
    share of images with at least one of their captions among the k captions most similar to them;
    text->image R@k: the share of captions whose image is among the k most similar images.
    text_image[j] = index of caption j's image."""
    n, t = image_feats.shape[0], text_feats.shape[0]
    kmax = max(ks)
    hit_i2t = {k: torch.zeros(n, dtype=torch.bool) for k in ks}
    for s in range(0, n, chunk):
        top = (image_feats[s : s + chunk] @ text_feats.T).topk(min(kmax, t), dim=1).indices  # [c, k]
        own = text_image[top] == torch.arange(s, min(s + chunk, n))[:, None]
        for k in ks:
            hit_i2t[k][s : s + chunk] = own[:, :k].any(dim=1)
    hit_t2i = {k: torch.zeros(t, dtype=torch.bool) for k in ks}
    for s in range(0, t, chunk):
        top = (text_feats[s : s + chunk] @ image_feats.T).topk(min(kmax, n), dim=1).indices
        own = top == text_image[s : s + chunk, None]
        for k in ks:
            hit_t2i[k][s : s + chunk] = own[:, :k].any(dim=1)
    out = {f"image_to_text_R@{k}": hit_i2t[k].double().mean().item() for k in ks}
    out.update({f"text_to_image_R@{k}": hit_t2i[k].double().mean().item() for k in ks})
    return out


def evaluate_retrieval(
    model,
    model_cfg,
    data_path,
    *,
    runtime: xla_utils.Runtime,
    precision: str = "auto",
    batch_size: int = 64,
    num_workers: int = 2,
    preprocess: Preprocess | None = None,
    tokenizer=None,
    text_batch_size: int = 256,
    progress: bool = False,
    limit: int | None = None,
) -> dict:
    """Image<->text retrieval recall@1/5/10 of `model` (on runtime.device) on a captioned set
    (load_caption_set's layouts). Same runtime, precision, preprocessing and static batch shapes as
    evaluate(); captions are tokenized at the model's context length, truncated, never masked.
    Several processes: each encodes its part, the features are gathered. Returns dict(
    image_to_text_R@k, text_to_image_R@k for k in 1, 5, 10, images, texts, skipped, ...)."""
    clip = unwrap(model)
    precision = runtime.precision(precision)
    if runtime.spmd and (batch_size % runtime.num_devices or runtime.world_size > 1):
        raise ValueError(
            "retrieval under SPMD needs one host and a batch size that is a multiple of "
            f"the {runtime.num_devices} devices"
        )
    cs = data_path if isinstance(data_path, CaptionSet) else load_caption_set(data_path)
    tok = tokenizer or get_tokenizer(model_cfg, reduction="truncate")
    pre = preprocess or Preprocess.for_model(model_cfg)
    ds = _CaptionedDataset(cs, pre.transform(), batch_size, runtime.rank, runtime.world_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, worker_init_fn=data.worker_init)
    was_training = clip.training
    clip.eval()
    feats, ids, caps, bad = [], [], [], 0
    t0 = time.time()
    try:
        runtime.step_boundary()
        for images, c, i, b in _progress(loader, progress and runtime.is_master, "images"):
            bad += b
            if images is None or (limit is not None and len(caps) >= limit):
                continue
            valid = images.shape[0]
            if valid < batch_size:  # static shape: zero images pad the last batch
                images = torch.cat([images, images.new_zeros((batch_size - valid, *images.shape[1:]))])
            (x,) = runtime.to_device(images)
            x = transforms.normalize(x, pre.image_mean, pre.image_std)
            with runtime.autocast(precision):
                f = clip.encode_image(x, normalize=True)
            feats.append((F.normalize(f.float(), dim=-1), valid))
            runtime.step_boundary()
            ids.append(i)
            caps += c
        image_feats = torch.cat([f.cpu()[:v] for f, v in feats]) if feats else torch.zeros(0, model_cfg.embed_dim)
        t1 = time.time()
        texts = [t for cs_ in caps for t in cs_]
        text_feats = _encode_texts(clip, tok(texts), runtime, precision, min(text_batch_size, max(1, len(texts))))
        runtime.synchronize()
        t2 = time.time()
    finally:
        clip.train(was_training)
    image_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    text_ids = torch.tensor([i for i, c in zip(image_ids.tolist(), caps) for _ in c], dtype=torch.long)
    parts = runtime.all_gather_object((image_feats, image_ids, text_feats, text_ids, bad))
    image_feats, image_ids, text_feats, text_ids = (torch.cat([p[j] for p in parts]) for j in range(4))
    bad = sum(p[4] for p in parts)
    if image_feats.shape[0] == 0:
        raise ValueError(f"no readable captioned images in {data_path}")
    order = image_ids.argsort()  # a fixed image order whatever the ranks did
    text_image = torch.searchsorted(image_ids[order], text_ids)
    text_order = text_image.argsort(stable=True)
    res = recall_at_k(image_feats[order], text_feats[text_order], text_image[text_order])
    return dict(
        res,
        images=int(image_feats.shape[0]),
        texts=int(text_feats.shape[0]),
        skipped=int(bad),
        layout=cs.layout,
        precision=precision,
        context_length=int(tok.context_length),
        image_seconds=round(t1 - t0, 2),
        text_seconds=round(t2 - t1, 2),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(pre).items()},
    )


def _progress(it, enabled, unit, total=None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, unit=f" {unit} batch", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- CLI


def _default_out(ckpt: str, dataset: str, task: str = "zeroshot") -> str:
    tag = os.path.basename(os.path.normpath(dataset)) or "data"
    ckpt = os.path.normpath(ckpt)
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt) or "."
    name = (
        f"{task}_{tag}.json"
        if os.path.isdir(ckpt)
        else f"{os.path.splitext(os.path.basename(ckpt))[0]}.{task}_{tag}.json"
    )
    return os.path.join(folder if os.access(folder, os.W_OK) else os.getcwd(), name)


def check_out(out: str, what: str = "--out") -> str:
    """`out` if the result JSON can be written there later: not a directory, below a directory (the
    nearest one that exists) that this process may write. Checked before the evaluation, whose
    result would otherwise be lost at its end. Raises ValueError."""
    if os.path.isdir(out):
        raise ValueError(f"{what} {out} is a directory; give a FILE.json")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {out}: {parent} is a file, not a directory")
    target = out if os.path.lexists(out) else parent
    if not os.access(target, os.W_OK) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {out}: {target} is not writable")
    return out


def _parse_args(argv=None):
    p = cli.ArgumentParser(
        prog="eval_zeroshot.py",
        description="Zero-shot classification accuracy and image-text retrieval recall of a CLIPA checkpoint.",
    )
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument(
        "--ckpt",
        help="run dir, checkpoint dir, .safetensors or torch state dict (ours, OpenCLIP or converted CLIPA-v2)",
    )
    w.add_argument(
        "--random-init", action="store_true", help="no weights: time the evaluation of a randomly initialised --model"
    )
    p.add_argument("--model", help="model name (default: read from the checkpoint's metadata)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--imagenet-val", metavar="DIR", help="ImageNet-1K val: ImageFolder val/ or TFDS dir")
    src.add_argument("--data", metavar="DIR", help="any ImageFolder (or TFDS) classification set")
    p.add_argument(
        "--retrieval",
        metavar="DATA",
        help="image<->text retrieval recall@1/5/10 on a captioned "
        "set: CLIP_benchmark's wds / mscoco_captions / flickr30k roots, or shards with captions",
    )
    p.add_argument("--format", choices=["imagefolder", "tfds"], default=None, help="default: detect")
    p.add_argument("--split", help="TFDS split (default: validation, else the dataset's only split)")
    p.add_argument(
        "--classnames",
        metavar="FILE",
        help="one class name per line, class-index order "
        "(default: ImageNet-1K for --imagenet-val, folder names for --data)",
    )
    p.add_argument("--templates", default="openai", help="openai (80), short (7) or FILE ('{}' = name)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--force-image-size", type=int, help="evaluate (and build the model) at this size")
    p.add_argument("--image-mean", type=float, nargs=3, metavar=("R", "G", "B"))
    p.add_argument("--image-std", type=float, nargs=3, metavar=("R", "G", "B"))
    p.add_argument("--interpolation", choices=["bicubic", "bilinear"])
    p.add_argument(
        "--square-resize-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="resize to a square without cropping (v2 default) vs short side + center crop",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=xla_utils.DEVICES,
        help="auto: cuda if a GPU is visible, xla if a TPU is attached, else cpu",
    )
    p.add_argument(
        "--precision", choices=xla_utils.PRECISIONS, default="auto", help="auto: bf16 autocast on CUDA, fp32 elsewhere"
    )
    p.add_argument("--limit", type=int, help="stop after about this many images per process (quick check)")
    p.add_argument("--out", metavar="FILE", help="JSON result (default: next to the checkpoint, else cwd)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_checkpoint_model(ckpt: str, model_name: str | None = None, image_size: int | None = None):
    """(model, name) from a checkpoint, its weights read once and its header once; the architecture
    comes from its metadata unless named. image_size (--force-image-size) builds the model at that
    size (position table resized)."""
    if model_name is not None:
        return create_model(model_name, image_size=image_size, pretrained=ckpt), model_name
    meta = read_metadata(ckpt)
    cfg = config_from_metadata(meta)
    if cfg is None:
        raise ValueError(
            f"{ckpt} records no model config (not a checkpoint of this project): pass "
            "--model NAME (python model.py list)"
        )
    return create_model(cfg, image_size=image_size, pretrained=ckpt), meta.get("model_name", "checkpoint")


def _inputs(args):
    """Everything the run needs from the user, checked before the device starts: (dataset path,
    class names, templates, preprocessing, model on the host, model name)."""
    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
        ("--limit", args.limit, 1),
    ):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.random_init and args.model is None:
        raise ValueError("--random-init needs --model NAME")
    dataset = args.imagenet_val or args.data
    if dataset is None and args.retrieval is None:
        raise ValueError("give a classification set (--imagenet-val DIR or --data DIR), --retrieval DATA, or both")
    if dataset is not None and not storage.exists(dataset):
        raise FileNotFoundError(f"dataset not found: {dataset}")
    captions = load_caption_set(args.retrieval) if args.retrieval else None
    if args.ckpt:
        checkpoints.resolve_checkpoint(args.ckpt, weights_only=True)  # a mistyped path first (a URL: fetched)
    out = check_out(
        args.out
        or _default_out(
            args.ckpt or os.path.join(os.getcwd(), args.model),
            dataset or args.retrieval,
            "zeroshot" if dataset else "retrieval",
        ),
        "--out" if args.out else "the result file",
    )
    templates = load_templates(args.templates)
    classnames = None
    if dataset is not None and (args.classnames or args.imagenet_val):
        classnames = load_classnames(args.classnames)
        check_eval_set(dataset, classnames, args.format, args.split)
    elif dataset is not None:  # --data without --classnames: the folder (synset) names
        classnames = [c.replace("_", " ") for c in eval_classes(dataset, args.format, args.split)]
    with warnings.catch_warnings(record=True) as caught:  # non-finite weights: one line each
        warnings.simplefilter("always", NonFiniteWeightsWarning)
        if args.random_init:
            net = create_model(args.model, image_size=args.force_image_size)
            name = args.model
        else:
            net, name = load_checkpoint_model(args.ckpt, args.model, args.force_image_size)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for note in getattr(net, "resized_pos_tables", []):  # weights trained at another size: say so
        print(f"warning: {args.ckpt}: {note}", file=sys.stderr)
    pre = Preprocess.for_model(
        net.cfg,
        image_mean=args.image_mean,
        image_std=args.image_std,
        interpolation=args.interpolation,
        square_resize_only=args.square_resize_only,
    )
    return dataset, classnames, templates, pre, net, name, captions, out


def _where(path: str) -> str:
    """`path` as the results record it: a URL as it is, a local path made absolute."""
    return path if storage.is_remote(path) else os.path.abspath(path)


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        dataset, classnames, templates, pre, net, name, captions, out = _inputs(args)
        runtime = xla_utils.init_runtime(args.device)
    except (ValueError, OSError) as err:  # user input: missing / unreadable files, unknown names
        return cli.usage_error(err)
    res = {}
    try:
        cfg = net.cfg
        net = net.to(runtime.device)
        if runtime.is_master:
            what = [f"{len(classnames)} classes x {len(templates)} templates"] if dataset else []
            what += [f"retrieval on {args.retrieval} ({captions.layout})"] if captions else []
            print(
                f"{runtime.describe()}; model {name} at {cfg.vision.image_size}px; prompts and captions "
                f"tokenized at context length {cfg.text.context_length} (truncation, no masking); " + "; ".join(what),
                file=sys.stderr,
            )
        common = dict(
            runtime=runtime,
            precision=args.precision,
            batch_size=args.batch_size,
            num_workers=args.workers,
            preprocess=pre,
            progress=not args.no_progress,
            limit=args.limit,
        )
        if dataset:
            res = evaluate(
                net,
                cfg,
                dataset,
                classnames=classnames,
                templates=templates,
                fmt=args.format,
                split=args.split,
                **common,
            )
        if captions:
            res["retrieval"] = dict(evaluate_retrieval(net, cfg, captions, **common), dataset=_where(args.retrieval))
    finally:
        runtime.shutdown()
    if not runtime.is_master:
        return 0
    ckpt = "random-init" if not args.ckpt else _where(args.ckpt)
    res = dict(
        model=name,
        checkpoint=ckpt,
        **({"dataset": _where(dataset)} if dataset else {}),
        device=runtime.kind,
        nonfinite_weights=len(getattr(net, "nonfinite_weights", [])),
        **res,
    )
    if dataset:
        print(
            f"top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
            f"mean per-class recall {100 * res['mean_per_class_recall']:.2f}%  ({res['n']} images, "
            f"{res['num_classes']} classes, context length {res['context_length']}"
            + (f", {res['skipped']} unreadable images skipped" if res["skipped"] else "")
            + ")"
        )
    if captions:
        r = res["retrieval"]
        print(
            "retrieval: image->text "
            + " ".join(f"R@{k} {100 * r[f'image_to_text_R@{k}']:.2f}%" for k in RECALL_K)
            + " | text->image "
            + " ".join(f"R@{k} {100 * r[f'text_to_image_R@{k}']:.2f}%" for k in RECALL_K)
            + f"  ({r['images']} images, {r['texts']} captions"
            + (f", {r['skipped']} unreadable skipped" if r["skipped"] else "")
            + ")"
        )
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    except OSError as err:  # the directory changed during the evaluation, a full disk
        print(f"error: the result could not be written to {out} ({err.strerror or err})", file=sys.stderr)
        return 1
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
