"""CLIPA data path: uint8 transforms with fast low-resolution JPEG decode for training, a sharded
and resumable training loader, evaluation loaders (ImageFolder or TFDS, e.g. ImageNet-1K
validation), and dataset stats. Shard specs, format detection and readers are in shards.py.

Design: the loader emits uint8 CHW batches (4x fewer bytes than float32 on the host->device link);
the device calls `normalize` once per batch. Training decodes JPEGs at a reduced DCT scale when the
crop is much smaller than the source, with the crop box mapped to the reduced image; evaluation
decodes at full resolution (torchvision's pixels).

CLI:  python data.py stats SPEC... [--format F] [--no-decode] [--split S]
      python data.py reshard SRC DST --max-side N [--quality Q] [--workers W]   (shards.py's pass)
The demo dataset lives in launch/demo_data.py, the loader benchmark in launch/bench_data.py.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageEnhance

import cli
import shards
import xla_utils
from shards import FORMATS, Raw, Source, find_tfds_dir, is_remote, read_shard, resolve

log = logging.getLogger("clipa.data")

DEFAULT_SHUFFLE = 1000  # samples per loader worker (raw JPEG bytes, ~10-50 KB each)
# the largest image (width x height) that is decoded: Pillow's decompression-bomb limit (0.25 GiB as
# RGB). One cap for the train and eval transforms and `stats`; a larger image is the counted skip
# "image_too_large", refused from its header before any pixel is decoded.
MAX_IMAGE_PIXELS = 89_478_485
END = 1 << 62  # "past the last shard" position
PIPE_BYTES = 1 << 22  # a worker's batch tensors up to this size travel through its pipe (_pipe)

_INTERP = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
}


# ----------------------------------------------------------------------------- small helpers


def mix(*xs: int) -> int:
    """Stateless 64-bit hash (splitmix64 chain): per-sample seeds that do not depend on worker
    layout or on how far a previous run got, so resumed runs replay exactly. The demo and the
    synthetic benchmark data draw their samples from it too."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h + 0x9E3779B97F4A7C15) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


# ----------------------------------------------------------------------------- transforms


class ImageTooLarge(ValueError):
    """An encoded image over MAX_IMAGE_PIXELS: refused before decoding."""


def _check_pixels(width: int, height: int):
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{width}x{height} image is over MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")


def _open_image(src) -> Image.Image:
    """A PIL image (returned as is), or encoded bytes / a path / a file object opened lazily,
    its size checked against MAX_IMAGE_PIXELS (Pillow's own bomb error counts as too large too)."""
    if isinstance(src, Image.Image):
        return src
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    _check_pixels(*img.size)
    return img


def _skip_reason(error: Exception) -> str:
    """The skip count an image transform's exception goes to: image_too_large or bad_image."""
    return "image_too_large" if isinstance(error, ImageTooLarge) else "bad_image"


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def random_resized_crop_params(width: int, height: int, scale, ratio, rng: random.Random):
    """(top, left, h, w), torchvision RandomResizedCrop's algorithm with our own RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(
    img: Image.Image, rng: random.Random, brightness=0.32, contrast=0.32, saturation=0.32, hue=0.08
) -> Image.Image:
    """torchvision ColorJitter semantics on PIL (same enhancers, random order, HSV hue shift)."""
    ops = [0, 1, 2, 3]
    rng.shuffle(ops)
    for op in ops:
        if op == 0 and brightness:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == 1 and contrast:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == 2 and saturation:
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - saturation, 1 + saturation))
        elif op == 3 and hue:
            h, s, v = img.convert("HSV").split()
            shift = np.uint8(int(rng.uniform(-hue, hue) * 255) % 256)
            h = Image.fromarray((np.asarray(h, dtype=np.uint8) + shift).astype(np.uint8), "L")
            img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return img


def _dct_scale(W: int, H: int, box, out_wh: tuple[int, int]) -> int:
    """JPEG DCT scale divisor (1, 2, 4, 8) for resizing `box` of a WxH image to out_wh: the
    largest whose decoded image still has >= out_wh pixels across the box (Pillow draft's rule)."""
    bw, bh = max(box[2] - box[0], 1e-6), max(box[3] - box[1], 1e-6)
    need = (max(1, math.ceil(W * out_wh[0] / bw)), max(1, math.ceil(H * out_wh[1] / bh)))
    r = min(W // need[0], H // need[1])
    return next((s for s in (8, 4, 2) if r >= s), 1)


def _axis_crop(a0: float, a1: float, n: int):
    """One axis of a resampling box [a0, a1) in an image n pixels long -> (c0, c1, flip): an
    integer crop whose first pixel edge (its last one when flip) is a box edge. The resampler's
    output grid starts at the crop's first edge, so the box is then resampled exactly. None
    when neither edge is integer (a box at an odd original pixel, seen at 1/2 scale)."""
    if a0 == int(a0):
        return int(a0), min(n, math.ceil(a1)), False
    if a1 == int(a1):
        return int(a0), int(a1), True
    return None


def _resize_box(img, box, size: int) -> torch.Tensor:
    """Resample `box` (x0, y0, x1, y1, fractional) of a decoded RGB image (HWC uint8 array or
    PIL image) to uint8 [3, size, size]: antialiased bicubic, PIL's filter (a=-0.5) and pixel
    grid. torch's uint8 AVX2 kernel (~2-3x faster than Pillow's resampler) when each axis has
    an integer box edge; Pillow's resize with the fractional box otherwise."""
    arr = isinstance(img, np.ndarray)
    h, w = img.shape[:2] if arr else img.size[::-1]
    cx, cy = _axis_crop(box[0], box[2], w), _axis_crop(box[1], box[3], h)
    if cx is None or cy is None:
        pil = Image.fromarray(img) if arr else img
        return _to_uint8_chw(pil.resize((size, size), Image.BICUBIC, box=box))
    (x0, x1, fx), (y0, y1, fy) = cx, cy
    if arr:
        hwc = torch.from_numpy(img)[y0:y1, x0:x1]
    else:  # bytearray: a writable buffer torch can share (Pillow's bytes are read-only)
        hwc = torch.frombuffer(bytearray(img.crop((x0, y0, x1, y1)).tobytes()), dtype=torch.uint8).view(
            y1 - y0, x1 - x0, 3
        )
    x = hwc.permute(2, 0, 1).unsqueeze(0)  # HWC memory read as channels-last CHW: no copy
    flips = [d for d, f in ((2, fy), (3, fx)) if f]
    if flips:
        x = x.flip(flips)
    # explicit scales: the output grid is the box's, even where the crop runs past its far edge
    out = torch.ops.aten._upsample_bicubic2d_aa(
        x, [size, size], False, size / (box[3] - box[1]), size / (box[2] - box[0])
    )
    if flips:
        out = out.flip(flips)
    return out[0].contiguous()


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio 3/4..4/3), bicubic, no flip; optional colour jitter
    (0.32, 0.32, 0.32, 0.08) at p=0.8 and grayscale at p=0.2. PIL image / JPEG bytes -> uint8 CHW.
    `rng` (random.Random) makes a call reproducible; None uses the module RNG.
    JPEGs are decoded at 1/2..1/8 DCT scale when the crop allows (simplejpeg, or Pillow's draft
    mode: same pixels), the crop box mapped to the decoded pixel grid, then resampled with
    antialiased bicubic in torch's uint8 kernel. draft=False decodes in full (torchvision's
    pixels); use_simplejpeg=False takes Pillow's decoder for everything (its fallback otherwise).
    Raises ImageTooLarge for an image over MAX_IMAGE_PIXELS, another exception for a bad one."""

    def __init__(
        self,
        image_size: int,
        scale=(0.4, 1.0),
        ratio=(3 / 4, 4 / 3),
        color_jitter: bool = False,
        draft: bool = True,
        use_simplejpeg: bool = True,
    ):
        self.size = int(image_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.color_jitter, self.draft, self.use_simplejpeg = color_jitter, draft, use_simplejpeg

    def _crop_turbo(self, src: bytes, rng) -> torch.Tensor | None:
        """simplejpeg path; None (before drawing from rng) when it cannot read the header."""
        try:
            H, W, _, _ = simplejpeg.decode_jpeg_header(src)
        except ValueError:
            return None
        _check_pixels(W, H)
        params = random_resized_crop_params(W, H, self.scale, self.ratio, rng)
        top, left, h, w = params
        box = (left, top, left + w, top + h)
        s = _dct_scale(W, H, box, (self.size, self.size)) if self.draft else 1
        try:
            arr = simplejpeg.decode_jpeg(src, "RGB", min_height=-(-H // s), min_width=-(-W // s))
        except ValueError:  # CMYK, corrupt or truncated data: Pillow decides
            return self._crop_pillow(src, rng, params)
        if arr.shape[:2] != (-(-H // s), -(-W // s)):  # tiny image: libjpeg chose an M/8 scale
            return self._crop_pillow(src, rng, params)
        return _resize_box(arr, tuple(v / s for v in box), self.size)

    def _crop_pillow(self, src, rng, params=None) -> torch.Tensor:
        img = _open_image(src)
        W, H = img.size
        top, left, h, w = params or random_resized_crop_params(W, H, self.scale, self.ratio, rng)
        box = (left, top, left + w, top + h)
        s = _dct_scale(W, H, box, (self.size, self.size)) if self.draft else 1
        # draft: a no-op once loaded (a PIL image passed in), then the scale stays 1
        if s == 1 or getattr(img, "format", None) != "JPEG" or img.draft("RGB", (W // s, H // s)) is None:
            s = 1
        if img.mode != "RGB":
            img = img.convert("RGB")
        return _resize_box(img, tuple(v / s for v in box), self.size)

    def __call__(self, src, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random
        x = None
        if self.use_simplejpeg and isinstance(src, (bytes, bytearray)) and src[:2] == b"\xff\xd8":
            x = self._crop_turbo(src, rng)
        if x is None:
            x = self._crop_pillow(src, rng)
        if not self.color_jitter:
            return x
        out = Image.fromarray(x.permute(1, 2, 0).numpy())
        if rng.random() < 0.8:
            out = color_jitter(out, rng)
        if rng.random() < 0.2:
            out = out.convert("L").convert("RGB")
        return _to_uint8_chw(out)


class EvalTransform:
    """Short-side resize + center crop (v1, bicubic) or square resize (v2, bilinear) -> uint8 CHW,
    decoded at full resolution: torchvision's Resize(size)+CenterCrop(size) / Resize((size, size))
    up to rounding. The one evaluation preprocessing (zero-shot eval and the model's transforms)."""

    def __init__(self, image_size: int, interpolation: str = "bicubic", square_resize_only: bool = False):
        if interpolation not in _INTERP:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(_INTERP)}")
        self.size, self.resample, self.square = int(image_size), _INTERP[interpolation], square_resize_only

    def __call__(self, src, rng=None) -> torch.Tensor:
        img = _open_image(src)
        W, H = img.size
        s = self.size
        if self.square:
            box = (0.0, 0.0, float(W), float(H))
        else:  # the crop of the resized image, mapped back to source pixels: one resampling
            ow, oh = (s, int(s * H / W)) if W <= H else (int(s * W / H), s)
            top, left = int(round((oh - s) / 2.0)), int(round((ow - s) / 2.0))
            box = (left * W / ow, top * H / oh, (left + s) * W / ow, (top + s) * H / oh)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return _to_uint8_chw(img.resize((s, s), self.resample, box=box))


def train_transform(image_size: int, scale=(0.4, 1.0), color_jitter: bool = False) -> TrainTransform:
    """The training preprocessing (make_train_loader's): random resized crop, draft decode."""
    return TrainTransform(image_size, scale=scale, color_jitter=color_jitter)


def eval_transform(image_size: int, interpolation: str = "bicubic", square_resize_only: bool = False) -> EvalTransform:
    """The evaluation preprocessing, full-resolution decode (see EvalTransform)."""
    return EvalTransform(image_size, interpolation, square_resize_only)


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] or [3,H,W] on any device -> (x/255 - mean)/std as `dtype`, on that device.
    The one device-side preprocessing step of training and evaluation (uint8 transfer)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=images.device).view(3, 1, 1) for v in (mean, std))
    # one fused multiply-add: x * (1/(255 std)) - mean/std
    return (images.float() * (1.0 / (255.0 * std_t)) - mean_t / std_t).to(dtype)


class Normalized:
    """Wrap a uint8 transform into an OpenCLIP-style one returning a normalised float CHW tensor."""

    def __init__(self, transform: Callable, mean, std):
        self.transform, self.mean, self.std = transform, tuple(mean), tuple(std)

    def __call__(self, src, *args, **kwargs) -> torch.Tensor:
        return normalize(self.transform(src, *args, **kwargs), self.mean, self.std)

    def __repr__(self):
        return f"Normalized({self.transform!r}, mean={self.mean}, std={self.std})"


# ----------------------------------------------------------------------------- training loader


@dataclass
class _Plan:
    """Which shards each of the W = world_size * num_workers readers reads in one epoch.
    Shard order is a permutation fixed by (seed, epoch). With at least W shards, reader g reads
    shards g, g+W, ... (shard-level sharding). With fewer shards than readers, every reader reads
    every shard and keeps record r of shard position p when (p + r) % W == g (sample-level
    striding): no reader idles, and still no record is read by two readers."""

    shards: list[str]  # all shards of the spec, in spec order (ids index this)
    order: list[int]  # shard ids in this epoch's order (excluded ones removed)
    readers: int  # W

    def assign(self, g: int) -> tuple[list[int], int]:
        if len(self.order) >= self.readers:
            return self.order[g :: self.readers], 1
        return list(self.order), self.readers


def _epoch_order(n: int, seed: int, epoch: int, exclude=()) -> list[int]:
    order = list(range(n))
    random.Random(mix(seed, epoch, 0x5EED)).shuffle(order)
    ex = set(exclude)
    return [i for i in order if i not in ex]


class _Entry(NamedTuple):
    pos: int  # position of the shard in this reader's list
    rec: int  # record index in the shard (counting bad records too)
    sid: int  # shard id (stable across epochs/topologies: seeds the augmentation)
    raw: Raw


@dataclass
class _StreamCfg:
    src: Source
    plan: _Plan
    seed: int
    epoch: int
    rank: int
    num_workers: int
    batch_size: int
    shuffle_buffer: int
    transform: Callable
    tokenizer: Callable | None
    snapshots: dict = field(default_factory=dict)  # local worker id -> snapshot to resume


def _reader_records(cfg: _StreamCfg, g: int, start_pos: int) -> Iterator[tuple[int, int, _Entry]]:
    """(pos, rec, entry) for every record reader g owns, from its shard position start_pos on;
    bad records included (entry.raw.reason set) so that positions never depend on content."""
    ids, stride = cfg.plan.assign(g)
    W = cfg.plan.readers
    for pos in range(start_pos, len(ids)):
        sid = ids[pos]
        for rec, raw in enumerate(read_shard(cfg.plan.shards[sid], cfg.src)):
            if stride > 1 and (pos + rec) % W != g:
                continue
            yield pos, rec, _Entry(pos, rec, sid, raw)


def _worker_batches(cfg: _StreamCfg, wid: int):
    """One loader worker: records -> shuffle buffer -> decode/augment -> batches (+ snapshot)."""
    g = cfg.rank * cfg.num_workers + wid
    base = mix(cfg.seed, cfg.epoch, g, 0xB0F)
    snap = cfg.snapshots.get(wid)
    if snap and snap.get("final"):  # this worker had finished its epoch before the save
        yield None, None, {"wid": wid, **snap}
        return
    stats: Counter = Counter(snap["stats"]) if snap else Counter()
    batches = snap["batches"] if snap else 0
    k = snap["k"] if snap else 0
    B = max(1, cfg.shuffle_buffer)
    buf: list[_Entry] = []
    keys: list[tuple[int, int]] = []  # (pos, rec) of buf's entries, kept beside it: a cheap snapshot
    resume_at = tuple(snap["next"]) if snap else (0, 0)
    records = _reader_records(cfg, g, 0)
    if snap:  # rebuild the shuffle buffer exactly: re-read (no decode) from its oldest shard
        need = {tuple(p): i for i, p in enumerate(snap["buf"])}
        start = min([resume_at[0]] + [p[0] for p in snap["buf"]])
        records = _reader_records(cfg, g, start)
        slots: list[_Entry | None] = [None] * len(need)
        first = None
        for pos, rec, e in records:
            if (pos, rec) >= resume_at:
                first = (pos, rec, e)
                break
            if (pos, rec) in need:
                slots[need[(pos, rec)]] = e
        buf = [e for e in slots if e is not None]
        keys = [(e.pos, e.rec) for e in buf]
        if len(buf) < len(slots):
            log.warning("resume: %d buffered records not found again (shards changed?)", len(slots) - len(buf))
        if first is not None:
            records = chain([first], records)
    logged = set()
    state = {"next": list(resume_at)}

    def shuffled():
        nonlocal k
        for pos, rec, e in records:
            state["next"] = [pos, rec + 1]
            if e.raw.reason is not None:
                stats[e.raw.reason] += 1
                if e.raw.reason not in logged:
                    logged.add(e.raw.reason)
                    log.warning("skipping bad sample (%s): %s in %s", e.raw.reason, e.raw.key, cfg.plan.shards[e.sid])
                continue
            if B <= 1:
                k += 1
                yield e
            elif len(buf) < B:
                buf.append(e)
                keys.append((pos, rec))
            else:
                i = mix(base, k) % B
                out, buf[i], keys[i] = buf[i], e, (pos, rec)
                k += 1
                yield out
        state["next"] = [END, 0]
        while buf:
            i = mix(base, k) % len(buf)
            out, buf[i], keys[i] = buf[i], buf[-1], keys[-1]
            del buf[-1], keys[-1]
            k += 1
            yield out

    images, texts = [], []
    for e in shuffled():
        try:
            x = cfg.transform(e.raw.image, random.Random(mix(cfg.seed, cfg.epoch, e.sid, e.rec)))
        except Exception as ex:  # noqa: BLE001 - any decoder error means a bad image
            reason = _skip_reason(ex)
            stats[reason] += 1
            if stats["bad_image"] >= 50 and not stats["samples"]:  # a bug, not bad data
                raise RuntimeError(
                    f"the first {stats['bad_image']} images all failed to decode; last error: {type(ex).__name__}: {ex}"
                ) from ex
            if reason not in logged:
                logged.add(reason)
                log.warning("skipping bad image (%s) %s in %s: %s", reason, e.raw.key, cfg.plan.shards[e.sid], ex)
            continue
        stats["samples"] += 1
        images.append(x)
        texts.append(e.raw.text)
        if len(images) == cfg.batch_size:
            rng = random.Random(mix(cfg.seed, cfg.epoch, g, batches, 0x70C))
            tokens = cfg.tokenizer(texts, rng=rng) if cfg.tokenizer is not None else texts
            batches += 1
            meta = {
                "wid": wid,
                "next": list(state["next"]),
                "k": k,
                "batches": batches,
                "buf": list(keys),
                "stats": dict(stats),
            }
            yield torch.stack(images), tokens, meta
            images, texts = [], []
    if images:  # static shapes: a worker's last partial batch of the epoch is dropped
        log.debug("reader %d: %d samples left over at the end of epoch %d", g, len(images), cfg.epoch)
    meta = {"wid": wid, "next": [END, 0], "k": k, "batches": batches, "buf": [], "stats": dict(stats), "final": True}
    yield None, None, meta


class _TrainDataset(torch.utils.data.IterableDataset):
    def __init__(self, cfg: _StreamCfg, pipe: bool):
        self.cfg, self.pipe = cfg, pipe

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        batches = _worker_batches(self.cfg, info.id if info is not None else 0)
        return ((_pipe(x), _pipe(t), m) for x, t, m in batches) if info is not None and self.pipe else batches


def _pipe(x):  # a tensor goes by shared memory: the main process fetches its file descriptor from
    # the worker over a socket, a round trip that waits for the worker to run (~1 ms a batch, busy CPU)
    return x.numpy() if isinstance(x, torch.Tensor) and x.nbytes <= PIPE_BYTES else x


def _unpipe(x):
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _identity(x):
    return x


def _generator(*xs: int) -> torch.Generator:
    """A DataLoader draws a seed each time it is iterated: from this generator, not from torch's
    global RNG, which is the trainer's (restored on resume; image masking draws from it)."""
    return torch.Generator().manual_seed(mix(*xs, 0xD1) >> 1)


def _worker_init(_):
    torch.set_num_threads(1)
    # A worker whose main process was killed would live on when a batch waits in the full pipe (its
    # queue's writer thread is joined at exit, and the worker itself holds the read end): leave then
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name) or str(default)
    if not v.strip().lstrip("+-").isdigit():
        raise ValueError(f"{name}={v!r} is not an integer")
    return int(v)


class TrainLoader:
    """Iterating yields (images uint8 [B,3,H,W], tokens LongTensor[B,T]) with exactly batch_size
    rows (a worker's last partial batch of an epoch is dropped: static shapes), epoch after epoch
    (repeat=True; .epoch counts up) or for one epoch. state_dict() is a plain JSON-able dict;
    passing it back as `state` continues with the very next batch: same samples, same order,
    none repeated, given the same seed / world size / workers / batch size / shuffle buffer
    (otherwise: shard granularity). The saved epoch overrides the `epoch` argument. Each rank
    has its own state (`state` may also be the list of all ranks' states: ours is picked).
    .samples / .skipped: good samples read and bad ones skipped by reason, all epochs so far."""

    def __init__(
        self,
        src: Source,
        tokenizer,
        transform,
        batch_size: int,
        *,
        num_workers: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        prefetch: int,
        repeat: bool,
        state: dict | list | None,
        pin_memory: bool,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.src, self.tokenizer, self.transform = src, tokenizer, transform
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.prefetch, self.repeat = shuffle_buffer, prefetch, repeat
        self.pin_memory, self.epoch = pin_memory, epoch
        self._exclude: list[int] = []
        self._workers: dict[int, dict] = {}
        self._batches = 0
        self._turn = 0  # worker whose batch comes next (round-robin)
        self._past = Counter()  # stats of finished epochs
        if state is not None:
            self._load_state(state)

    # -- state
    def _topology(self) -> dict:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "num_shards": len(self.src.shards),
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "epoch": self.epoch,
            "batches": self._batches,
            "turn": self._turn,
            "exclude": list(self._exclude),
            **self._topology(),
            "workers": {str(w): {**s, "buf": [list(p) for p in s["buf"]]} for w, s in self._workers.items()},
            "past_stats": dict(self._past),
        }

    def _load_state(self, state):
        if isinstance(state, (list, tuple)):  # states of all ranks: take ours
            mine = [s for s in state if s.get("rank") == self.rank]
            state = mine[0] if mine else state[0]
        if state.get("version") != 1:
            raise ValueError("unknown loader state version")
        self.epoch = int(state["epoch"])
        self._past = Counter(state.get("past_stats", {}))
        same = all(state.get(k) == v for k, v in self._topology().items())
        if same:
            self._exclude = list(state.get("exclude", []))
            self._workers = {int(w): s for w, s in state.get("workers", {}).items()}
            self._batches = int(state.get("batches", 0))
            self._turn = int(state.get("turn", 0))
            return
        # Different layout: resume at shard granularity - drop the shards this state finished.
        done = set(state.get("exclude", []))
        snw = max(1, state["num_workers"])
        W = state["world_size"] * snw
        order = _epoch_order(state["num_shards"], state["seed"], self.epoch, done)
        plan = _Plan(self.src.shards, order, W)
        if state["num_shards"] == len(self.src.shards) and len(order) >= W:
            for w, s in state.get("workers", {}).items():
                ids, _ = plan.assign(state["rank"] * snw + int(w))
                oldest = min([s["next"][0]] + [p[0] for p in s["buf"]])
                done.update(ids[: min(oldest, len(ids))])
        log.warning(
            "loader state from a different layout (%s); resuming epoch %d at shard granularity, %d shards already done",
            ", ".join(f"{k}={state.get(k)}" for k, v in self._topology().items() if state.get(k) != v),
            self.epoch,
            len(done),
        )
        self._exclude = sorted(done) if state["num_shards"] == len(self.src.shards) else []

    # -- stats
    @property
    def skipped(self) -> dict:
        c = sum((Counter(s["stats"]) for s in self._workers.values()), Counter(self._past))
        c.pop("samples", None)
        return {k: v for k, v in sorted(c.items()) if v}

    @property
    def samples(self) -> int:
        return self._past["samples"] + sum(s["stats"].get("samples", 0) for s in self._workers.values())

    # -- iteration
    def _dataloader(self):
        readers = self.world_size * max(1, self.num_workers)
        plan = _Plan(self.src.shards, _epoch_order(len(self.src.shards), self.seed, self.epoch, self._exclude), readers)
        cfg = _StreamCfg(
            self.src,
            plan,
            self.seed,
            self.epoch,
            self.rank,
            max(1, self.num_workers),
            self.batch_size,
            self.shuffle_buffer,
            self.transform,
            self.tokenizer,
            dict(self._workers),
        )
        kw = {"generator": _generator(self.seed, self.epoch, self.rank)}
        if self.num_workers > 0:
            kw.update(
                prefetch_factor=max(1, math.ceil(self.prefetch / self.batch_size)),
                worker_init_fn=_worker_init,
                persistent_workers=False,
            )
        # pin_memory rebuilds each (images, tokens, meta) item as a list with meta copied: _ordered
        # only unpacks and indexes it, so batches and loader state are the same either way
        return torch.utils.data.DataLoader(
            _TrainDataset(cfg, pipe=not self.pin_memory),
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kw,
        )

    def _ordered(self, dl):
        """Batches in a fixed round-robin over workers (skipping finished ones), starting at the
        saved turn: the same global order whether or not the epoch was interrupted. Batches that
        the DataLoader delivers early wait in small per-worker queues."""
        nw = max(1, self.num_workers)
        queues = {w: [] for w in range(nw)}
        active = [w for w in range(nw) if not self._workers.get(w, {}).get("final")]
        it = iter(dl)
        while active:
            w = self._turn if self._turn in active else active[0]
            while not queues[w]:
                try:
                    item = next(it)
                except StopIteration:  # cannot happen before every worker said "final"
                    raise RuntimeError("loader workers ended without a final marker") from None
                queues[item[2]["wid"]].append(item)
            images, tokens, meta = queues[w].pop(0)
            del meta["wid"]
            self._workers[w] = meta
            i = active.index(w)
            if images is None:  # worker w finished its part of the epoch
                active.remove(w)
                self._turn = active[i % len(active)] if active else 0
                continue
            self._turn = active[(i + 1) % len(active)]
            yield _unpipe(images), _unpipe(tokens), meta
        for _ in it:  # let the DataLoader shut its workers down cleanly
            pass

    def __iter__(self):
        if self.src.fmt in ("tfrecord", "tfds"):
            xla_utils.import_tensorflow()  # in the parent, before forking workers (docs/platforms.md)
        while True:
            for images, tokens, _meta in self._ordered(self._dataloader()):
                self._batches += 1
                yield images, tokens
            stats = sum((Counter(s["stats"]) for s in self._workers.values()), Counter())
            log.info(
                "epoch %d done (rank %d): %d batches, %d samples read, skipped %s",
                self.epoch,
                self.rank,
                self._batches,
                stats.get("samples", 0),
                json.dumps({k: v for k, v in stats.items() if k != "samples"}),
            )
            if self._batches == 0:  # repeating would spin forever without a batch
                raise ValueError(
                    f"no training batch of {self.batch_size} from {len(self.src.shards)} "
                    f"shard(s) on rank {self.rank}: {stats.get('samples', 0)} good samples, "
                    f"skipped {dict(self.skipped)}"
                )
            self._past.update(stats)
            self.epoch += 1
            self._workers, self._batches, self._exclude, self._turn = {}, 0, [], 0
            if not self.repeat:
                return


def make_train_loader(
    spec,
    tokenizer,
    image_size: int,
    batch_size: int,
    *,
    fmt: str | None = None,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int | None = None,
    prefetch: int | None = None,
    scale=(0.4, 1.0),
    color_jitter: bool = False,
    state: dict | list | None = None,
    repeat: bool = True,
    split: str = "train",
    pin_memory: bool = False,
) -> TrainLoader:
    """Training loader over webdataset / TFRecord / TFDS shards (see TrainLoader).
    shuffle_buffer: samples per worker (default $TFDS_SHUFFLE_SIZE or 1000); prefetch: samples
    per worker decoded ahead (default $TFDS_PREFETCH_SIZE or 2 batches). Host memory is about
    num_workers * (shuffle_buffer * JPEG size + prefetch * 3*H*W bytes).
    tokenizer: tokenizer.py Tokenizer (called per batch with a seeded rng); None yields captions.
    pin_memory: page-locked image batches, so that the copy to the device can be asynchronous
    (the trainer passes xla_utils.Runtime.pin_memory: true on CUDA)."""
    src = resolve(spec, fmt, split)
    shuffle_buffer = _env_int("TFDS_SHUFFLE_SIZE", DEFAULT_SHUFFLE) if shuffle_buffer is None else shuffle_buffer
    prefetch = _env_int("TFDS_PREFETCH_SIZE", 2 * batch_size) if prefetch is None else prefetch
    return TrainLoader(
        src,
        tokenizer,
        train_transform(image_size, scale, color_jitter),
        batch_size,
        num_workers=num_workers,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        prefetch=prefetch,
        repeat=repeat,
        state=state,
        pin_memory=pin_memory,
    )


# ----------------------------------------------------------------------------- evaluation loaders

_IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")


def _image_folder(path: str) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir())
    if not classes:
        raise ValueError(f"{path}: no class sub-directories (expected an ImageFolder tree val/<class>/<image>)")
    items = []
    for label, c in enumerate(classes):
        for root, _, files in sorted(os.walk(os.path.join(path, c))):
            items += [(os.path.join(root, f), label) for f in sorted(files) if f.lower().endswith(_IMG_EXTS)]
    if not items:
        raise ValueError(f"{path}: no images under the class directories")
    return items, classes


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with open(path, "rb") as f:
                return self.transform(f.read()), label
        except Exception as e:  # noqa: BLE001
            log.warning("skipping unreadable image %s: %s", path, e)
            return None, label


def _collate_eval(batch):
    good = [(x, y) for x, y in batch if x is not None]
    return (
        torch.stack([x for x, _ in good]) if good else None,
        torch.tensor([y for _, y in good]) if good else None,
        len(batch) - len(good),
    )


class _ShardEvalDataset(torch.utils.data.IterableDataset):
    """TFDS eval split: shards split over ranks and workers like training, no shuffle."""

    def __init__(self, src: Source, transform, batch_size: int, rank: int, world_size: int):
        self.src, self.transform, self.batch_size = src, transform, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        g, W = self.rank * nw + wid, self.world_size * nw
        plan = _Plan(self.src.shards, list(range(len(self.src.shards))), W)
        ids, stride = plan.assign(g)
        xs, ys, bad = [], [], 0
        for pos, sid in enumerate(ids):
            for rec, raw in enumerate(read_shard(self.src.shards[sid], self.src)):
                if stride > 1 and (pos + rec) % W != g:
                    continue
                if raw.reason is not None:
                    bad += 1
                    continue
                try:
                    xs.append(self.transform(raw.image))
                    ys.append(raw.text)
                except Exception:  # noqa: BLE001
                    bad += 1
                if len(xs) == self.batch_size:
                    yield torch.stack(xs), torch.tensor(ys), bad
                    xs, ys, bad = [], [], 0
        if xs or bad:
            yield (torch.stack(xs) if xs else None), (torch.tensor(ys) if ys else None), bad


class EvalLoader:
    """Iterating yields (images uint8 [b,3,H,W], labels LongTensor[b]); the last batch may be
    short. .num_samples (this rank, before skips), .skipped (unreadable images seen so far)."""

    def __init__(self, dl, num_samples: int | None):
        self.dl, self.num_samples, self.skipped = dl, num_samples, 0

    def __iter__(self):
        for images, labels, bad in self.dl:
            self.skipped += bad
            if images is not None:
                yield images, labels

    def __len__(self):
        return len(self.dl)


def make_eval_loader(
    path,
    transform,
    batch_size: int,
    *,
    fmt: str | None = None,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    split: str = "validation",
) -> tuple[EvalLoader, list[str]]:
    """ImageNet-style evaluation data: an ImageFolder tree (labels = sorted folder names) or a TFDS
    directory (e.g. imagenet2012, split 'validation', labels from its ClassLabel feature).
    Each rank reads a disjoint part. Returns (loader, class folder / label names in label order)."""
    path = os.fspath(path)
    if fmt not in (None, "imagefolder", "tfds"):
        raise ValueError(f"unknown eval format {fmt!r}; choose imagefolder or tfds")
    if not is_remote(path) and not os.path.exists(path):
        raise FileNotFoundError(f"no such evaluation directory: {path!r}")
    if fmt == "tfds" or (fmt is None and find_tfds_dir(path)):
        src = resolve(path, "tfds", split)
        if src.label_key is None:
            raise ValueError(f"{path}: TFDS dataset has no ClassLabel feature")
        ds = _ShardEvalDataset(src, transform, batch_size, rank, world_size)
        xla_utils.import_tensorflow()
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, collate_fn=_identity, num_workers=num_workers, generator=_generator(rank)
        )
        return EvalLoader(dl, None), list(src.classes)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory (expected an ImageFolder tree or TFDS dir)")
    items, classes = _image_folder(path)
    n = len(items)
    part = items[rank * n // world_size : (rank + 1) * n // world_size]
    dl = torch.utils.data.DataLoader(
        _FolderDataset(part, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_eval,
        generator=_generator(rank),
    )
    return EvalLoader(dl, len(part)), classes


# ----------------------------------------------------------------------------- stats


def dataset_stats(spec, fmt: str | None = None, decode: bool = True, split: str = "train") -> dict:
    """Read every record (and decode every image as the train loader does, its transform at 16 px:
    mostly 1/8 DCT scale) and count good / bad ones by the loader's reasons. Bad data is counted,
    never raised; `spec` may be a resolved Source."""
    t0 = time.time()
    src = resolve(spec, fmt, split)
    check = train_transform(16)
    reasons: Counter = Counter()
    samples = empty = chars = 0
    for path in src.shards:
        if not is_remote(path) and not os.path.exists(path):
            reasons["unreadable_shard"] += 1
            log.warning("missing shard %s", path)
            continue
        n = 0
        for raw in read_shard(path, src):
            n += 1
            if raw.reason is None and decode:
                try:
                    check(raw.image, random.Random(0))
                except Exception as e:  # noqa: BLE001 - any decoder error means a bad image
                    raw = raw._replace(reason=_skip_reason(e))
            if raw.reason is None:
                samples += 1
                chars += len(raw.text) if isinstance(raw.text, str) else 0
            else:
                reasons[raw.reason] += 1
        empty += n == 0  # img2dataset: a shard whose downloads all failed (0 bytes / no members)
    return {
        "format": src.fmt,
        "shards": len(src.shards),
        "empty_shards": empty,
        "samples": samples,
        "skipped": sum(reasons.values()),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "mean_caption_chars": round(chars / max(samples, 1), 1),
        "seconds": round(time.time() - t0, 2),
    }


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stats", help="read a dataset end to end; print one JSON object")
    p.add_argument("spec", nargs="+", help="shards: brace pattern, glob, directory or files")
    p.add_argument("--format", choices=FORMATS, default=None)
    p.add_argument("--no-decode", action="store_true", help="do not decode images")
    p.add_argument("--split", default="train", help="TFDS split (e.g. validation)")
    p = sub.add_parser("reshard", help="copy shards with each image re-encoded to a bounded side")
    p.add_argument("src", help="shards (webdataset tar or TFRecord): brace pattern, glob, directory")
    p.add_argument("dst", help="local output directory: the same shard names, the same format")
    p.add_argument("--max-side", type=int, required=True, help="longest image side, e.g. 2x the pre-train px")
    p.add_argument("--quality", type=int, default=shards.RESHARD_QUALITY, help="JPEG / WebP quality")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    p.add_argument("--format", choices=FORMATS, default=None)
    args = ap.parse_args(argv)
    xla_utils.TF_AFTER_XLA = False  # this process never uses XLA: skip the torch_xla import
    logging.basicConfig(level=logging.INFO, format="[data] %(message)s", stream=sys.stderr)
    try:  # a spec that does not resolve is the user's error; anything later is a bug or bad data
        spec = args.src if args.cmd == "reshard" else args.spec[0] if len(args.spec) == 1 else args.spec
        src = resolve(spec, args.format, getattr(args, "split", "train"))
        plan = args.cmd == "reshard" and shards.reshard_plan(
            src, args.dst, args.max_side, args.quality, args.workers, MAX_IMAGE_PIXELS
        )
    except (ValueError, OSError) as e:
        return cli.usage_error(e)
    out = shards.reshard(plan) if plan else dataset_stats(src, decode=not args.no_decode)
    print(json.dumps(out))
    return 1 if plan and out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
