"""Input-pipeline throughput: transforms.py's training transform against the usual OpenCLIP one.

    python launch/bench_data.py synth /tmp/synth [--n 2048] [--size 400x300]
    python launch/bench_data.py bench '/tmp/synth/{00000..00003}.tar' [--image-size 96] [--workers 2]
    python launch/bench_data.py bench /tmp/synth --compare /tmp/synth192 [--sizes 64,84,96,112]
    python launch/bench_data.py crops /tmp/synth /tmp/synth192 [--sizes 64,96,112]

`synth` writes photo-like JPEG webdataset shards (crops of a real photograph re-encoded at
--size, ~35 KB at 400x300 q90 like LAION images). `bench` decodes, augments and batches the same
records with both pipelines in one thread, alternating batch by batch so machine load hits both
alike, and prints images per CPU-second (= per core); --workers N also times data.py's whole
loader with N worker processes. With --compare (shards `python data.py reshard` wrote from the
first spec), the training transform runs on both, interleaved the same way, at each of --sizes.
`crops` measures what resharding changes in the training crops: the mean absolute difference
(0-255 pixel levels) between the loader's crop of each original image and the same crop box,
mapped to the resharded image, resampled by the same bicubic filter.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from matplotlib import cbook  # noqa: E402
from PIL import Image, ImageDraw, ImageEnhance  # noqa: E402
from torchvision import transforms as tv  # noqa: E402

import cli  # noqa: E402
import data  # noqa: E402
import factory  # noqa: E402
import model  # noqa: E402
import shards  # noqa: E402
import transforms  # noqa: E402
import xla_utils  # noqa: E402


def openclip_style_transform(image_size: int, scale=(0.4, 1.0)):
    """The usual OpenCLIP training pipeline, the baseline: full decode, RandomResizedCrop,
    ToTensor, Normalize -> float32."""
    bicubic = tv.InterpolationMode.BICUBIC
    tf = tv.Compose(
        [
            tv.RandomResizedCrop(image_size, scale=scale, interpolation=bicubic),
            tv.ToTensor(),
            tv.Normalize(model.OPENAI_MEAN, model.OPENAI_STD),
        ]
    )
    return lambda b: tf(Image.open(io.BytesIO(b)).convert("RGB"))


def bench(
    spec,
    image_size: int = 96,
    n: int = 512,
    batch_size: int = 64,
    fmt: str | None = None,
    workers: int = 0,
    tokenizer=None,
    repeats: int = 2,
) -> dict:
    """images/s/core of the training transform (transforms.py) vs the OpenCLIP-style one on the
    same records: one thread, in-memory JPEG bytes, decode + augment + batch, timed in process CPU time (so other
    load on the machine does not count); optionally the whole loader with N workers (wall time)."""
    src = shards.resolve(spec, fmt)
    torch.set_num_threads(1)
    recs = []
    for path in src.shards:  # the first n good records; a shard is read only as far as needed
        recs += itertools.islice((r.image for r in shards.read_shard(path, src) if r.reason is None), n - len(recs))
        if len(recs) >= n:
            break
    if not recs:
        raise ValueError("no readable samples to benchmark")
    pipelines = (transforms.train_transform(image_size), openclip_style_transform(image_size))
    sizes = [Image.open(io.BytesIO(b)).size for b in recs[:64]]

    def rates():  # images per CPU-second of this (single-threaded) process = per core
        spent = [0.0, 0.0]
        for i in range(0, len(recs), batch_size):  # batch by batch, in turn
            for k, fn in enumerate(pipelines):
                t0 = time.process_time()
                torch.stack([fn(b) for b in recs[i : i + batch_size]])
                spent[k] += time.process_time() - t0
        return [len(recs) / t for t in spent]

    random.seed(0)
    torch.manual_seed(0)
    ours = theirs = 0.0
    for _ in range(repeats):  # best of N passes
        a, b = rates()
        ours, theirs = max(ours, a), max(theirs, b)
    out = {
        "image_size": image_size,
        "images": len(recs),
        "source_size": [round(sum(s[0] for s in sizes) / len(sizes)), round(sum(s[1] for s in sizes) / len(sizes))],
        "ours_images_per_s_per_core": round(ours, 1),
        "openclip_images_per_s_per_core": round(theirs, 1),
        "speedup": round(ours / theirs, 2),
        "batch_bytes_uint8": batch_size * 3 * image_size**2,
        "batch_bytes_float32": batch_size * 3 * image_size**2 * 4,
        "batch_size": batch_size,
    }
    if workers > 0:
        loader = data.make_train_loader(
            src, tokenizer, image_size, batch_size, num_workers=workers, shuffle_buffer=256, repeat=False
        )
        it = iter(loader)
        next(it)  # worker start-up excluded
        t0, got = time.perf_counter(), 0
        for images, _ in it:
            got += images.shape[0]
            if got >= n:
                break
        dt = time.perf_counter() - t0
        out["loader_workers"] = workers
        out["loader_images_per_s"] = round(got / dt, 1) if got else 0.0
        out["loader_images_per_s_per_worker"] = round(got / dt / workers, 1) if got else 0.0
    return out


def _decodes(image: bytes) -> bool:
    try:
        Image.open(io.BytesIO(image)).load()
        return True
    except Exception:  # noqa: BLE001 - what the loader would skip as a bad image
        return False


def _records(spec, n: int, fmt: str | None = None) -> list[tuple[str, bytes]]:
    """(key, image bytes) of the first n good records whose image decodes; a shard is read only
    as far as needed."""
    src = shards.resolve(spec, fmt)
    recs = []
    for path in src.shards:
        good = ((r.key, r.image) for r in shards.read_shard(path, src) if r.reason is None and _decodes(r.image))
        recs += itertools.islice(good, n - len(recs))
        if len(recs) >= n:
            break
    if not recs:
        raise ValueError("no readable samples to benchmark")
    return recs


def _pairs(spec, other, n: int, fmt: str | None = None) -> list[tuple[bytes, bytes]]:
    """(original image, resharded image) of the first n good records, matched by key."""
    a, b = _records(spec, n, fmt), dict(_records(other, 4 * n, fmt))
    pairs = [(x, b[k]) for k, x in a if k in b]
    if len(pairs) < len(a):
        raise ValueError(
            f"{len(a) - len(pairs)} of the first {len(a)} samples of {spec} are not in "
            f"{other}: compare shards with the ones `data.py reshard` wrote from them"
        )
    return pairs


def compare(
    spec, other, sizes=(64, 84, 96, 112), n: int = 512, batch_size: int = 64, rounds: int = 3, fmt: str | None = None
) -> list[dict]:
    """images/s/core of the training transform (transforms.py) on original vs resharded shards (and
    of the OpenCLIP-style one on the originals), per image size: rounds x sizes x batches, the three
    pipelines in turn batch by batch, process CPU time, best round kept."""
    torch.set_num_threads(1)
    pairs = _pairs(spec, other, n, fmt)
    best = {(s, k): 0.0 for s in sizes for k in range(3)}
    random.seed(0)
    for _ in range(rounds):
        for size in sizes:
            ours, theirs = transforms.train_transform(size), openclip_style_transform(size)
            runs = ((ours, 0), (ours, 1), (theirs, 0))
            spent = [0.0, 0.0, 0.0]
            for i in range(0, len(pairs), batch_size):
                for k, (fn, j) in enumerate(runs):
                    t0 = time.process_time()
                    torch.stack([fn(p[j]) for p in pairs[i : i + batch_size]])
                    spent[k] += time.process_time() - t0
            for k in range(3):
                best[size, k] = max(best[size, k], len(pairs) / spent[k])
    sides = [[Image.open(io.BytesIO(p[j])).size for p in pairs[:64]] for j in (0, 1)]
    mean = [[round(sum(s[d] for s in ss) / len(ss)) for d in (0, 1)] for ss in sides]
    return [
        {
            "image_size": s,
            "images": len(pairs),
            "source_size": mean[0],
            "resharded_size": mean[1],
            "original_images_per_s_per_core": round(best[s, 0], 1),
            "resharded_images_per_s_per_core": round(best[s, 1], 1),
            "openclip_original_images_per_s_per_core": round(best[s, 2], 1),
            "speedup": round(best[s, 1] / best[s, 0], 2),
            "speedup_vs_openclip": round(best[s, 1] / best[s, 2], 2),
        }
        for s in sizes
    ]


def crop_difference(
    spec, other, sizes=(64, 96, 112), n: int = 512, seed: int = 0, fmt: str | None = None, scale_min: float = 0.4
) -> list[dict]:
    """Per training size: the mean absolute pixel difference between the loader's crop of each
    original image (TrainTransform, draft decode, RNG seeded per image) and the same crop box
    scaled to the resharded image, resampled with the same filter (Pillow's antialiased bicubic,
    which the loader's resampler equals) from a full decode (the loader's, at these sizes: a
    2x-resharded image is too small for DCT scaling). As a yardstick, the same difference
    against a full decode of the original: what the loader's DCT-scaled decode already changes."""
    pairs = _pairs(spec, other, n, fmt)
    out = []
    for size in sizes:
        t = transforms.train_transform(size, scale=(scale_min, 1.0))
        diff = {"resharded": 0.0, "full_decode": 0.0}
        for i, (a, b) in enumerate(pairs):
            ours = t(a, random.Random(data.mix(seed, i))).float()
            img_a = Image.open(io.BytesIO(a)).convert("RGB")
            W, H = img_a.size
            top, left, h, w = transforms.random_resized_crop_params(
                W, H, t.scale, t.ratio, random.Random(data.mix(seed, i))
            )
            img_b = Image.open(io.BytesIO(b)).convert("RGB")
            fx, fy = img_b.width / W, img_b.height / H
            for name, img, (sx, sy) in (("resharded", img_b, (fx, fy)), ("full_decode", img_a, (1, 1))):
                crop = img.resize(
                    (size, size), Image.BICUBIC, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)
                )
                x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float()
                diff[name] += (ours - x).abs().mean().item() / len(pairs)
        out.append(
            {
                "image_size": size,
                "images": len(pairs),
                "mean_abs_diff_resharded": round(diff["resharded"], 3),
                "mean_abs_diff_full_decode": round(diff["full_decode"], 3),
            }
        )
    return out


def make_synthetic_shards(
    out_dir: str, n: int = 2048, size=(400, 300), shard_size: int = 512, seed: int = 0, quality: int = 90
) -> str:
    """JPEG shards in img2dataset's webdataset layout: random crops of a real photograph
    (matplotlib's sample photo) with colour shifts and a few drawn shapes, re-encoded at `size`.
    Returns the brace spec."""
    os.makedirs(out_dir, exist_ok=True)
    W, H = size
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    pw, ph = photo.size
    n_shards = max(1, math.ceil(n / shard_size))
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(out_dir, f"{s:05d}.tar"), mtime=0) as tw:
            for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                rng = random.Random(data.mix(seed, i, 0xBE7C))
                w = int(pw * rng.uniform(0.5, 1.0))
                h = min(ph, int(w * H / W))
                w = int(h * W / H)
                x, y = rng.randint(0, pw - w), rng.randint(0, ph - h)
                img = photo.resize((W, H), Image.BICUBIC, box=(x, y, x + w, y + h))
                img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))
                d = ImageDraw.Draw(img)
                for _ in range(rng.randint(2, 6)):
                    x, y = rng.randint(-50, W), rng.randint(-50, H)
                    box = [x, y, x + rng.randint(20, 120), y + rng.randint(20, 120)]
                    fill = tuple(rng.randint(0, 255) for _ in range(3))
                    (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=quality)
                key = f"{i:09d}"
                tw.write(
                    {
                        "__key__": key,
                        "jpg": buf.getvalue(),
                        "txt": f"a synthetic photo number {i}",
                        "json": json.dumps({"key": key, "width": W, "height": H}),
                    }
                )
    return os.path.join(out_dir, f"{{00000..{n_shards - 1:05d}}}.tar")


def _print_table(r: dict):
    print(f"{'pipeline':<34}{'images/s/core':>14}")
    print(f"{'ours (draft decode, uint8)':<34}{r['ours_images_per_s_per_core']:>14}")
    print(f"{'OpenCLIP-style (full decode, f32)':<34}{r['openclip_images_per_s_per_core']:>14}")
    if "loader_workers" in r:
        print(
            f"{'ours, loader with ' + str(r['loader_workers']) + ' workers':<34}"
            f"{r['loader_images_per_s_per_worker']:>14}  ({r['loader_images_per_s']} images/s)"
        )
    print(
        f"speedup {r['speedup']}x; batch of {r['batch_size']}: "
        f"{r['batch_bytes_uint8']} bytes uint8 vs {r['batch_bytes_float32']} float32"
    )


def _print_rows(rows: list[dict]):
    cols = [k for k in rows[0] if k not in ("images", "source_size", "resharded_size")]
    print("  ".join(c.replace("_images_per_s_per_core", " img/s/core") for c in cols))
    for r in rows:
        print("  ".join(str(r[c]) for c in cols))


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="bench_data.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("synth", help="write photo-like JPEG webdataset shards")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--size", default="400x300", help="WxH")
    p = sub.add_parser("bench", help="images/s/core of data.py's pipeline vs the OpenCLIP-style one")
    p.add_argument("spec", nargs="+", help="shards: brace pattern, glob, directory or files")
    p.add_argument("--format", choices=shards.FORMATS, default=None)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--n", type=int, default=512, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="also time the loader with N worker processes")
    p.add_argument("--model", default=None, help="tokenize with this model's tokenizer (loader run)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs, best kept")
    p.add_argument("--compare", default=None, metavar="SPEC", help="resharded copy of SPEC: time both")
    p.add_argument("--sizes", default="64,84,96,112", help="image sizes for --compare")
    p = sub.add_parser("crops", help="pixel difference of training crops, original vs resharded")
    p.add_argument("spec", nargs=1, help="original shards")
    p.add_argument("other", help="the shards `data.py reshard` wrote from them")
    p.add_argument("--format", choices=shards.FORMATS, default=None)
    p.add_argument("--sizes", default="64,96,112", help="training image sizes")
    p.add_argument("--n", type=int, default=512, help="images compared")
    p.add_argument("--scale-min", type=float, default=0.4, help="RandomResizedCrop scale=(MIN, 1)")
    args = ap.parse_args(argv)
    xla_utils.TF_AFTER_XLA = False  # a benchmark never uses XLA: skip the torch_xla import
    if args.cmd == "synth":
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            return cli.usage_error(f"--size must look like 400x300, got {args.size!r}")
        if args.n < 1 or w < 1 or h < 1:
            return cli.usage_error("--n and both --size dimensions must be >= 1")
        print(make_synthetic_shards(args.out_dir, args.n, (w, h)))
        return 0
    try:
        sizes = [int(v) for v in args.sizes.split(",")]
    except ValueError:
        return cli.usage_error(f"--sizes must look like 64,96,112, got {args.sizes!r}")
    if args.cmd == "crops" or args.compare:
        if (
            min(sizes + [args.n, getattr(args, "batch_size", 1), getattr(args, "repeats", 1)]) < 1
            or not 0 < getattr(args, "scale_min", 1) <= 1
        ):
            return cli.usage_error("--sizes, --n, --batch-size and --repeats must be >= 1, --scale-min in (0, 1]")
        try:
            other = args.other if args.cmd == "crops" else args.compare
            run = crop_difference if args.cmd == "crops" else compare
            kw = (
                {"scale_min": args.scale_min}
                if args.cmd == "crops"
                else {"batch_size": args.batch_size, "rounds": args.repeats}
            )
            spec = args.spec[0] if len(args.spec) == 1 else args.spec
            _pairs(spec, other, 1, args.format)  # both specs checked before the long run
        except (ValueError, OSError) as e:
            return cli.usage_error(e)
        rows = run(spec, other, sizes, n=args.n, fmt=args.format, **kw)
        _print_rows(rows)
        print(json.dumps(rows))
        return 0
    if min(args.image_size, args.n, args.batch_size, args.repeats) < 1 or args.workers < 0:
        return cli.usage_error("--image-size, --n, --batch-size and --repeats must be >= 1, --workers >= 0")
    try:
        src = shards.resolve(args.spec[0] if len(args.spec) == 1 else args.spec, args.format)
        tok = factory.get_tokenizer(args.model) if args.model else None
    except (ValueError, OSError) as e:
        return cli.usage_error(e)
    r = bench(src, args.image_size, args.n, args.batch_size, workers=args.workers, tokenizer=tok, repeats=args.repeats)
    _print_table(r)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
