"""Test images and captions. image_bytes: one encoded picture of a given size and format, the same for
a seed. A small learnable image-caption set (coloured shapes, PNG), written in every layout our
evaluations and CLIP_benchmark read, from the same bytes: an ImageFolder for classification,
CLIP_benchmark's webdataset classification and retrieval roots, its flickr30k and mscoco_captions roots,
and plain webdataset shards with one caption per line (plus one undecodable image). write_wds and
write_tfrecord: shards as webdataset's TarWriter and TensorFlow's TFRecordWriter write them."""

import io
import json
import os
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

import xla_utils

COLOURS = {"red": (215, 35, 35), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (225, 205, 40)}
SHAPES = ("square", "circle", "triangle")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 12 classes, label = index
CAPTIONS = ("a {}", "a photo of a {}", "a small {} in the middle", "there is a {} here")
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.")


def image_bytes(seed: int, size=(96, 72), fmt="JPEG", mode="RGB", quality=90) -> bytes:
    """A plain background with 4 ellipses (edges for the codec to keep), encoded: deterministic per
    seed, any size of at least 10 x 10 pixels."""
    rng = np.random.RandomState(seed)
    img = Image.new("RGB", size, tuple(int(x) for x in rng.randint(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randint(0, size[0] - 10), rng.randint(0, size[1] - 10)
        d.ellipse([x, y, x + rng.randint(5, 40), y + rng.randint(5, 40)], tuple(int(v) for v in rng.randint(0, 255, 3)))
    buf = io.BytesIO()
    img.convert(mode).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def draw(label: int, rng, size=None) -> Image.Image:
    colour, shape = CLASSES[label].split()
    w, h = (size, size) if size else (int(v) for v in rng.integers(34, 64, 2))
    bg = rng.integers(0, 256, 3)
    img = Image.fromarray(rng.normal(bg, 25, (h, w, 3)).clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = int(min(w, h) * rng.uniform(0.45, 0.8))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255))
    if shape == "square":
        d.rectangle([x, y, x + s, y + s], fill=fill)
    elif shape == "circle":
        d.ellipse([x, y, x + s, y + s], fill=fill)
    else:
        d.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return img


def make_pairs(n: int, seed: int, size: int | None = None) -> list[tuple[bytes, int, list[str]]]:
    """(PNG bytes, label, 1-3 captions) x n, deterministic. PNG: lossless, so every decoder (ours,
    Pillow in CLIP_benchmark) sees the same pixels and equal numbers do not hang on JPEG decoders.
    size: square images of that many pixels (the model's: no resampling either), else 34-63 px."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % len(CLASSES)
        buf = io.BytesIO()
        draw(label, rng, size).save(buf, "PNG")
        # unique captions (picture number): identical strings would tie and make recall@k arbitrary
        caps = [
            CAPTIONS[int(j)].format(CLASSES[label]) + f", picture {i}"
            for j in rng.choice(len(CAPTIONS), int(rng.integers(1, 4)), replace=False)
        ]
        out.append((buf.getvalue(), label, caps))
    return out


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_layouts(root: str, pairs) -> dict:
    """Paths of every layout (keys: imagefolder, classnames, templates, cb_root, cb_cls, cb_ret,
    flickr, coco, shards, shards_bad)."""
    os.makedirs(root, exist_ok=True)
    p = {k: os.path.join(root, k) for k in ("imagefolder", "cb")}
    for i, (jpg, label, _) in enumerate(pairs):
        d = os.path.join(p["imagefolder"], f"{label:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:05d}.png"), "wb") as f:
            f.write(jpg)
    p["classnames"] = os.path.join(root, "classnames.txt")
    _write(p["classnames"], "\n".join(CLASSES) + "\n")
    p["templates"] = os.path.join(root, "templates.txt")
    _write(p["templates"], "\n".join(TEMPLATES) + "\n")
    half = (len(pairs) + 1) // 2
    for kind in ("cls", "ret"):  # CLIP_benchmark's `wds/NAME` roots, 2 shards each
        d = os.path.join(p["cb"], kind)
        os.makedirs(os.path.join(d, "test"), exist_ok=True)
        for s, chunk in enumerate((pairs[:half], pairs[half:])):
            members = []
            for i, (jpg, label, caps) in enumerate(chunk):
                key = f"s{s}_{i:05d}"
                members += [
                    (f"{key}.png", jpg),
                    (
                        (f"{key}.cls", str(label).encode())
                        if kind == "cls"
                        else (f"{key}.txt", "\n".join(caps).encode())
                    ),
                ]
            _tar(os.path.join(d, "test", f"{s}.tar"), members)
        _write(os.path.join(d, "test", "nshards.txt"), "2\n")
        if kind == "cls":
            _write(os.path.join(d, "classnames.txt"), "\n".join(CLASSES) + "\n")
            _write(
                os.path.join(d, "zeroshot_classification_templates.txt"),
                "\n".join(t.replace("{}", "{c}") for t in TEMPLATES) + "\n",
            )
        else:
            _write(os.path.join(d, "dataset_type.txt"), "retrieval\n")
        p[f"cb_{kind}"] = d
    p["cb_root"] = os.path.join(p["cb"], "{dataset}")
    # CLIP_benchmark flickr30k root: the images + flickr30k_test_karpathy.txt (its parser wants .jpg
    # names; Pillow and our decoder read the PNG bytes by content)
    p["flickr"] = os.path.join(p["cb"], "flickr30k")
    os.makedirs(p["flickr"], exist_ok=True)
    lines = ["image,caption"]
    for i, (jpg, _, caps) in enumerate(pairs):
        with open(os.path.join(p["flickr"], f"{i:06d}.jpg"), "wb") as f:
            f.write(jpg)
        lines += [f"{i:06d}.jpg,{c}" for c in caps]
    _write(os.path.join(p["flickr"], "flickr30k_test_karpathy.txt"), "\n".join(lines) + "\n")
    # CLIP_benchmark mscoco_captions root: val2014/ + coco_test_karpathy.json (COCO captions format)
    p["coco"] = os.path.join(p["cb"], "mscoco_captions")
    os.makedirs(os.path.join(p["coco"], "val2014"), exist_ok=True)
    images, anns = [], []
    for i, (jpg, _, caps) in enumerate(pairs):
        name = f"COCO_val2014_{i:012d}.png"
        with open(os.path.join(p["coco"], "val2014", name), "wb") as f:
            f.write(jpg)
        images.append({"id": 1000 + 7 * i, "file_name": name})
        anns += [{"id": len(anns) + j, "image_id": 1000 + 7 * i, "caption": c} for j, c in enumerate(caps)]
    _write(os.path.join(p["coco"], "coco_test_karpathy.json"), json.dumps({"images": images, "annotations": anns}))
    # plain webdataset shards with captions, one undecodable image among them
    p["shards"] = os.path.join(root, "shards")
    os.makedirs(p["shards"], exist_ok=True)
    for s, chunk in enumerate((pairs[:half], pairs[half:])):
        members = []
        for i, (jpg, _, caps) in enumerate(chunk):
            members += [(f"{s}_{i:05d}.png", jpg), (f"{s}_{i:05d}.txt", "\n".join(caps).encode())]
        if s == 1:
            members += [("bad.jpg", b"\xff\xd8 not a jpeg"), ("bad.txt", b"a broken image")]
        _tar(os.path.join(p["shards"], f"{s:05d}.tar"), members)
    return p


def write_wds(path, samples):
    """A webdataset tar of `samples` (dicts with __key__ and one entry per member), by webdataset itself."""
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def write_tfrecord(path, records):
    """A TFRecord file of tf.train.Examples, one bytes feature per entry of each record, by TensorFlow."""
    tf = xla_utils.import_tensorflow()
    with tf.io.TFRecordWriter(str(path)) as w:
        for feats in records:
            feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feats.items()}
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
