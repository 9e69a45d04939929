"""The procedural demo dataset: CLIPA's trade-off, measurable on a laptop CPU with no downloads.

    python launch/demo_data.py OUT_DIR [--n-train 10000] [--n-val 1080] [--image-size 64] [--seed 0]

Each training pair is a JPEG of one coloured shape (size, position, background vary) and an
alt-text-like caption about it; the held-out set is an ImageFolder tree of 36 "<colour> <shape>"
classes for zero-shot evaluation. The shards are written by the real writers (webdataset TarWriter,
TensorFlow TFRecordWriter), so the training run reads them exactly as it reads LAION shards.
Everything is a pure function of (seed, split, index): regenerating gives byte-identical files.

Importable as `demo_data` with launch/ on sys.path:  make_demo_dataset(out_dir, ...) -> DemoDataset.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import checkpoints  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import xla_utils  # noqa: E402

log = logging.getLogger("clipa.demo_data")

STAMP_VERSION = 2  # 2: the held-out images' captions as a retrieval shard

# Classes of the zero-shot set: "<colour> <shape>" (6 x 6 = 36). Colour alone or shape alone
# gets 1/6 of the way, so accuracy separates models that bind both words to the image.
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 185),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a {}.",
    "a small {}.",
    "a large {}.",
    "there is a {}.",
)
# Lead-ins with no content words: >= 6 BPE tokens, so truncation to 8 tokens (SOT + 6 + EOT)
# keeps only them, while syntax masking (nouns > adjectives > verbs > rest) drops them first.
_LEADS = (
    "if you look very closely you will see",
    "as far as i can tell this is",
    "it is hard to say but there seems to be",
    "i would say that what you see here is",
    "when you look at it you can notice",
    "to be honest with you it looks like",
    "at first glance you might not notice",
    "believe it or not this is simply",
    "so what we have got here is",
    "you can probably tell that there is",
)
_SHORT_LEADS = ("", "a photo of", "there is", "here is", "this is")
_SIZES = ("small", "large")
_ANCHORS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "middle": (0.5, 0.5),
}
_BG_WORDS = {"plain": "plain", "gradient": "faded", "stripes": "striped", "checks": "checkered", "noise": "grainy"}


@dataclass
class DemoDataset:
    root: str
    train_wds: str  # brace spec of the webdataset tar shards
    train_tfrecord: str  # brace spec of the TFRecord shards (same samples)
    val_dir: str  # ImageFolder tree: val/<NN_colour_shape>/*.jpg
    val_captions: str  # the same held-out images with their captions (retrieval): one tar
    classnames: list[str]
    templates: list[str]
    n_train: int
    n_val: int


def classnames() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


# ----------------------------------------------------------------------------- one sample


def _background(rng: random.Random, S: int) -> tuple[Image.Image, str, tuple, tuple]:
    """A muted SxS background (never a class colour): (image, kind, its tint, its base grey)."""
    kind = rng.choice(list(_BG_WORDS))
    base = [rng.randint(60, 200)] * 3
    tint = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in base)
    img = Image.new("RGB", (S, S), tint)
    shift = rng.choice((-50, 50))
    other = tuple(min(255, max(0, c + shift + rng.randint(-10, 10))) for c in tint)
    if kind == "gradient":
        t = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
        arr = np.asarray(tint, np.float32) * (1 - t) + np.asarray(other, np.float32) * t
        img = Image.fromarray(np.broadcast_to(arr, (S, S, 3)).astype(np.uint8))
    elif kind in ("stripes", "checks"):
        w = rng.randint(4, 12) if kind == "stripes" else rng.randint(6, 16)
        yy, xx = np.mgrid[0:S, 0:S]
        on = (xx // w) % 2 == 0 if kind == "stripes" else ((xx // w) + (yy // w)) % 2 == 0
        img = Image.fromarray(np.where(on[:, :, None], np.asarray(other, np.uint8), np.asarray(tint, np.uint8)))
    elif kind == "noise":
        noise = np.random.RandomState(rng.randrange(1 << 31)).randint(-30, 31, (S, S, 1))
        img = Image.fromarray((np.asarray(img, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8))
    return img, kind, tint, tuple(base)


def _scene(rng: random.Random, size: int, colour: str, shape: str, big: bool, where: str) -> tuple[Image.Image, str]:
    S = size * 2  # draw at 2x, downsample: anti-aliased edges
    img, kind, tint, base = _background(rng, S)
    d = ImageDraw.Draw(img)
    r = S * (rng.uniform(0.28, 0.38) if big else rng.uniform(0.14, 0.2))
    lo, hi = r + 2, S - r - 2
    ax, ay = _ANCHORS[where]
    cx = min(hi, max(lo, S * ax + rng.uniform(-0.08, 0.08) * S))
    cy = min(hi, max(lo, S * ay + rng.uniform(-0.08, 0.08) * S))
    col = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    rot = rng.uniform(-0.3, 0.3)

    def poly(points):
        return [
            (cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot)) for x, y in points
        ]

    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], col)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], col)
        q = r * 0.55
        d.ellipse([cx - q, cy - q, cx + q, cy + q], tint if kind != "noise" else base)
    elif shape == "square":
        q = r * 0.85
        d.polygon(poly([(-q, -q), (q, -q), (q, q), (-q, q)]), col)
    elif shape == "triangle":
        d.polygon(poly([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)]), col)
    elif shape == "star":
        pts = [
            (
                (r if i % 2 == 0 else r * 0.42) * math.sin(i * math.pi / 5),
                -(r if i % 2 == 0 else r * 0.42) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
        d.polygon(poly(pts), col)
    elif shape == "cross":
        t = r * 0.33
        d.polygon(
            poly(
                [
                    (-t, -r),
                    (t, -r),
                    (t, -t),
                    (r, -t),
                    (r, t),
                    (t, t),
                    (t, r),
                    (-t, r),
                    (-t, t),
                    (-r, t),
                    (-r, -t),
                    (-t, -t),
                ]
            ),
            col,
        )
    return img.reduce(2), kind  # 2x2 box filter: anti-aliased edges


def _caption(rng: random.Random, colour: str, shape: str, big: bool, where: str, bg: str) -> str:
    size = _SIZES[big]
    lead = rng.choice(_LEADS) if rng.random() < 0.8 else rng.choice(_SHORT_LEADS)
    obj = rng.choice(
        (
            f"{colour} {shape}",
            f"{size} {colour} {shape}",
            f"{shape} that is {colour}",
            f"{size} {shape} coloured {colour}",
        )
    )
    obj = rng.choice(("an " if obj[0] in "aeiou" else "a ", "one ")) + obj
    tail = rng.choice(
        (
            "",
            "",
            f" in the {where}",
            f" on a {_BG_WORDS[bg]} background",
            f" near the {where} on a {_BG_WORDS[bg]} background",
        )
    )
    return " ".join(x for x in (lead, obj + tail) if x)


def draw_sample(seed: int, split: int, i: int, size: int, label: int | None = None):
    """(JPEG bytes, caption, metadata) of sample i of split 0 (train, random class) or 1 (held
    out, class `label`); a pure function of its arguments."""
    rng = random.Random(data.mix(seed, split, i, 0xDE30))
    if label is None:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    else:
        colour, shape = list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    big, where = rng.random() < 0.5, rng.choice(list(_ANCHORS))
    img, bg = _scene(rng, size, colour, shape, big, where)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    meta = {"colour": colour, "shape": shape, "size": _SIZES[big], "position": where, "background": bg}
    return buf.getvalue(), _caption(rng, colour, shape, big, where, bg), meta


# ----------------------------------------------------------------------------- the dataset


def make_demo_dataset(
    out_dir: str, n_train: int = 10000, n_val: int = 1080, seed: int = 0, image_size: int = 64, shard_size: int = 1000
) -> DemoDataset:
    """Write the demo dataset (idempotent: a stamp matching the parameters and file sizes means
    the files are reused). out_dir/train/wds/NNNNN.tar (webdataset TarWriter, img2dataset layout),
    out_dir/train/tfrecord/NNNNN.tfrecord (TFRecordWriter, features jpg/txt/key/json),
    out_dir/val/<NN_class>/ (ImageFolder, n_val/36 per class), out_dir/val_captions/00000.tar (the
    same images with their captions, for retrieval), classnames.txt, templates.txt, demo_stamp.json."""
    params = {
        "version": STAMP_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
    }
    out_dir = os.path.abspath(out_dir)
    names = classnames()
    n_shards = max(1, math.ceil(n_train / shard_size))
    last = f"{n_shards - 1:05d}"
    ds = DemoDataset(
        out_dir,
        os.path.join(out_dir, "train", "wds", f"{{00000..{last}}}.tar"),
        os.path.join(out_dir, "train", "tfrecord", f"{{00000..{last}}}.tfrecord"),
        os.path.join(out_dir, "val"),
        os.path.join(out_dir, "val_captions", "00000.tar"),
        names,
        list(TEMPLATES),
        n_train,
        n_val,
    )
    stamp_path = os.path.join(out_dir, "demo_stamp.json")
    if _stamp_ok(stamp_path, out_dir, params):
        log.info("demo dataset in %s is up to date (stamp matches)", out_dir)
        return ds
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    for sub in ("train", "val", "val_captions", "classnames.txt", "templates.txt", "demo_stamp.json"):
        p = os.path.join(out_dir, sub)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    # every sample is a pure function of seed/split/index: draw them all first, on all cores
    jobs = [(seed, 0, i, image_size, None) for i in range(n_train)] + [
        (seed, 1, i, image_size, i % len(names)) for i in range(n_val)
    ]
    procs = min(os.cpu_count() or 1, 8)
    if procs > 1 and len(jobs) >= 2000:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            drawn = pool.starmap(draw_sample, jobs, chunksize=256)
    else:
        drawn = [draw_sample(*j) for j in jobs]
    _write_train_shards(out_dir, drawn[:n_train], shard_size)
    os.makedirs(os.path.dirname(ds.val_captions))
    with wds.TarWriter(ds.val_captions, mtime=0) as captions:
        for i in range(n_val):
            label = i % len(names)
            d = os.path.join(out_dir, "val", f"{label:02d}_{names[label].replace(' ', '_')}")
            os.makedirs(d, exist_ok=True)
            jpg, cap, _ = drawn[n_train + i]
            with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
                f.write(jpg)
            captions.write({"__key__": f"{i:06d}", "jpg": jpg, "txt": cap})
    with open(os.path.join(out_dir, "classnames.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(out_dir, "templates.txt"), "w") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    files = {}
    for root, _, fs in os.walk(out_dir):
        for fn in fs:
            if fn != "demo_stamp.json":
                p = os.path.join(root, fn)
                files[os.path.relpath(p, out_dir)] = os.path.getsize(p)
    # the stamp is written last and atomically: an interrupted run leaves no valid stamp
    checkpoints.atomic_write_text(json.dumps({"params": params, "files": files}), stamp_path)
    log.info("wrote demo dataset (%d train, %d val) to %s in %.1fs", n_train, n_val, out_dir, time.time() - t0)
    return ds


def _write_train_shards(out_dir: str, drawn: list, shard_size: int):
    """The same samples as webdataset tars and as TFRecord files, shard for shard."""
    tf = xla_utils.import_tensorflow()
    os.makedirs(os.path.join(out_dir, "train", "wds"))
    os.makedirs(os.path.join(out_dir, "train", "tfrecord"))
    for s in range(max(1, math.ceil(len(drawn) / shard_size))):
        name = f"{s:05d}"
        with (
            wds.TarWriter(os.path.join(out_dir, "train", "wds", name + ".tar"), mtime=0) as tw,
            tf.io.TFRecordWriter(os.path.join(out_dir, "train", "tfrecord", name + ".tfrecord")) as rw,
        ):
            for i in range(s * shard_size, min(len(drawn), (s + 1) * shard_size)):
                jpg, cap, meta = drawn[i]
                key = f"{i:09d}"
                js = json.dumps({"key": key, "caption": cap, **meta})
                tw.write({"__key__": key, "jpg": jpg, "txt": cap, "json": js})
                feats = {"jpg": jpg, "txt": cap.encode(), "key": key.encode(), "json": js.encode()}
                ex = tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feats.items()
                        }
                    )
                )
                rw.write(ex.SerializeToString(deterministic=True))  # map order: sorted keys


def _stamp_ok(stamp_path: str, out_dir: str, params: dict) -> bool:
    try:
        with open(stamp_path) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    if stamp.get("params") != params:
        return False
    return all(
        os.path.exists(p := os.path.join(out_dir, rel)) and os.path.getsize(p) == size
        for rel, size in stamp.get("files", {}).items()
    )


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="demo_data.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-val", type=int, default=1080, help="held-out images (a multiple of 36)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n_train < 1 or args.n_val < 0 or args.n_val % (len(COLOURS) * len(SHAPES)) or args.image_size < 8:
        return cli.usage_error(
            f"need --n-train >= 1, --n-val a multiple of {len(COLOURS) * len(SHAPES)} "
            "(every class equally) and --image-size >= 8"
        )
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        return cli.usage_error(f"{args.out_dir} exists and is not a directory")
    xla_utils.TF_AFTER_XLA = False  # this process never uses XLA: skip the torch_xla import
    logging.basicConfig(level=logging.INFO, format="[demo_data] %(message)s", stream=sys.stderr)
    ds = make_demo_dataset(args.out_dir, args.n_train, args.n_val, args.seed, args.image_size)
    print(json.dumps(asdict(ds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
