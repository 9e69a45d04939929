"""CLIPA's inverse scaling law in miniature: a grid of real training runs on the demo data.

    python launch/sweep.py [--out sweep_out] [--sizes S,M,L] [--image-px 16,32,64] [--text-tokens 4,8,16,32]
                           [--reductions syntax,truncate,frequency] [--seeds 3] [--samples 6400] [--jobs 2]
                           [--factorial] [--report-only]

Each cell of the grid is one model size (the toy ladder ViT-Toy{S,M,L,XL} of model.py: width and depth
grow together), one image size (patch 8: 16 px = I5, 32 px = I17, 64 px = I65 image tokens with CLS), one
text length (T4 ... T32) and one text reduction, trained from scratch by the real train.py (the `demo`
preset's pre-train stage: its lr, warmup and batch) for the same number of samples, then scored by the
real eval_zeroshot.py on the demo's held-out 36-class set. Every cell runs with several seeds (weights and
data order); the table gives mean +- std over seeds.

The default grid moves one factor at a time around a reference (--ref-px, --ref-text):
- image axis: every --image-px at --ref-text text tokens with the first reduction;
- text axis: every --text-tokens at --ref-px with the first reduction, and every other reduction at each
  text length below the longest (at the longest, captions fit and the reductions agree).
--factorial runs the whole product instead.

Zero-shot prompts are the bare class name ("{}" -> SOT red circle EOT: 4 tokens), so every text length
from T4 up scores the same prompts; the demo's sentence templates would be cut to "a photo of" at T4.
A cell is evaluated at the image size and text length it was trained at (the checkpoint's model).

Outputs in --out: results.md (table), results.csv, results.json (cells and rows), inverse_scaling.png
(top-1 and the accuracy lost to fewer tokens, per model size), text_reductions.png (the reductions at
each shorter text length). A rerun reuses finished cells of the same command, data and code (as
launch/demo.py does); checkpoints are deleted once a cell is scored unless --keep-checkpoints.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402  (launch/, beside this file)
import demo_data  # noqa: E402

import checkpoints  # noqa: E402
import cli  # noqa: E402
import config  # noqa: E402
import model as M  # noqa: E402
import tokenizer as tokenizer_lib  # noqa: E402

PATCH = 8  # the toy ladder's patch size
# Cost of a cell on one core, fitted on this repository's toy models (2-core x86 VM, one thread per run):
# seconds per sample = SEC_PER_SAMPLE + SEC_PER_GFLOP x forward GFLOPs per sample, plus process start,
# checkpoint and evaluation. Only the first ETA uses it; later ones scale it by the measured pace.
SEC_PER_SAMPLE, SEC_PER_GFLOP, CELL_OVERHEAD_S = 5.4e-4, 4.9e-2, 8.0


def toy_model(size: str) -> str:
    return f"ViT-Toy{size}-8-CL16-GAP"


TOY_SIZES = [s for s in ("S", "M", "L", "XL") if toy_model(s) in M.MODEL_CONFIGS]


@dataclass(frozen=True)
class Cell:
    size: str  # toy ladder rung
    image_px: int
    text_tokens: int
    reduction: str
    seed: int

    @property
    def point(self) -> tuple:
        """What the seeds are averaged over."""
        return (self.size, self.image_px, self.text_tokens, self.reduction)

    @property
    def key(self) -> str:
        return f"{self.size}_px{self.image_px}_T{self.text_tokens}_{self.reduction}_seed{self.seed}"

    @property
    def image_tokens(self) -> int:
        return (self.image_px // PATCH) ** 2 + 1  # patches + CLS


@dataclass(frozen=True)
class Grid:
    sizes: list[str]
    image_px: list[int]
    text_tokens: list[int]
    reductions: list[str]  # the first is the axes' reduction
    seeds: list[int]
    ref_px: int
    ref_text: int
    factorial: bool = False


def cells(g: Grid) -> list[Cell]:
    """The grid's cells in run order, no duplicates: seed by seed (a sweep stopped early has whole grids of
    fewer seeds), and in a seed the largest models first (the slowest start early)."""
    base, t_max = g.reductions[0], max(g.text_tokens)
    points = []
    if g.factorial:
        for px, t, red in itertools.product(g.image_px, g.text_tokens, g.reductions):
            if red == base or t < t_max:
                points.append((px, t, red))
    else:
        points += [(px, g.ref_text, base) for px in g.image_px]
        points += [(g.ref_px, t, base) for t in g.text_tokens]
        points += [(g.ref_px, t, red) for red in g.reductions[1:] for t in g.text_tokens if t < t_max]
    return [
        Cell(size, px, t, red, seed)
        for seed in g.seeds
        for size in reversed(g.sizes)
        for px, t, red in dict.fromkeys(points)
    ]


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} is empty")
    return list(dict.fromkeys(values))


def parse_grid(a) -> Grid:
    """The command line -> a Grid; ValueError (one line) for anything that cannot run."""
    sizes = list(dict.fromkeys(s.strip() for s in a.sizes.split(",") if s.strip()))
    if not sizes or set(sizes) - set(TOY_SIZES):
        bad = sorted(set(sizes) - set(TOY_SIZES)) or ["(none)"]
        raise ValueError(f"--sizes: unknown size {bad[0]!r}; valid: {', '.join(TOY_SIZES)}")
    image_px = int_list(a.image_px, "--image-px")
    for px in image_px + [a.ref_px]:
        if px < PATCH or px % PATCH:
            raise ValueError(f"image size {px} px is not a positive multiple of the patch size {PATCH}")
    text_tokens = int_list(a.text_tokens, "--text-tokens")
    for t in text_tokens + [a.ref_text]:
        if not 4 <= t <= 77:
            raise ValueError(f"text length {t} out of range: 4 (SOT + 2 words + EOT) to 77")
    reductions = list(dict.fromkeys(r.strip() for r in a.reductions.split(",") if r.strip()))
    bad = [r for r in reductions if r not in tokenizer_lib.REDUCTIONS]
    if not reductions or bad:
        raise ValueError(
            f"--reductions: unknown reduction {(bad or ['(none)'])[0]!r}; valid: {', '.join(tokenizer_lib.REDUCTIONS)}"
        )
    if a.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
    if a.samples < a.batch_size or a.batch_size < 1:
        raise ValueError(f"--samples ({a.samples}) must be >= --batch-size ({a.batch_size}) >= 1")
    if a.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {a.jobs}")
    return Grid(sizes, image_px, text_tokens, reductions, list(range(a.seeds)), a.ref_px, a.ref_text, a.factorial)


# ----------------------------------------------------------------------------- one cell


def train_argv(c: Cell, data: str, samples: int, batch: int, counts: str) -> list[str]:
    """train.py flags of a cell: the demo preset's pre-train stage, changed only by overrides."""
    sets = {
        "model": toy_model(c.size),
        "image_size": c.image_px,
        "context_length": c.text_tokens,
        "text_reduction": c.reduction,
        "batch_size": batch,
        "train_num_samples": samples,
    }
    if c.reduction == "frequency":
        sets["word_counts"] = counts
    argv = ["--cfg", "demo", "--stage", "pretrain", "--train-data", data, "--train-format", "wds"]
    argv += ["--seed", str(c.seed)]
    for k, v in sets.items():
        argv += ["--set", f"pretrain.{k}={v}"]
    return argv


def predicted_seconds(c: Cell, samples: int) -> float:
    cfg = M.get_model_config(toy_model(c.size), image_size=c.image_px, context_length=c.text_tokens)
    return CELL_OVERHEAD_S + samples * (SEC_PER_SAMPLE + SEC_PER_GFLOP * M.count_flops(cfg)["total_gflops"])


def run_quiet(cmd: list[str], log_path: str, threads: int) -> None:
    """Run a real script with its output in log_path; a failure raises with the log's path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    env.setdefault("PJRT_DEVICE", "CPU")
    with open(log_path, "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[1])} failed (exit {p.returncode}); log: {log_path}")


def run_cell(c: Cell, a, ds, templates: str, counts: str, fingerprint: str) -> dict:
    out = os.path.join(a.out, "cells", c.key)
    if os.path.exists(out):  # unfinished, or another command / code: start again, clean
        shutil.rmtree(out)
    os.makedirs(out)
    argv = train_argv(c, ds.train_wds, a.samples, a.batch_size, counts)
    _, stages, _ = config.parse_args(argv)
    stage = stages[0][1]
    flops = M.count_flops(stage.model_config())
    t0 = time.time()
    train = [sys.executable, "train.py", *argv, "--out", out, "--workers", str(a.workers)]
    run_quiet(train + ["--log-every", "25", "--save-every", "100000"], os.path.join(out, "train.log"), a.threads)
    train_s = time.time() - t0
    eval_json = os.path.join(out, "zeroshot.json")
    run_quiet(
        demo.eval_command(out, ds, templates, eval_json, 0, retrieval=False),
        os.path.join(out, "eval.log"),
        a.threads,
    )
    with open(eval_json) as f:
        ev = json.load(f)
    losses = [m["loss"] for m in demo.read_metrics(out) if "loss" in m]
    r = {
        **asdict(c),
        "key": c.key,
        "model": stage.model,
        "image_tokens": flops["patches_kept"] + 1,
        "samples": stage.steps * stage.batch_size,
        "train_gflops": 3 * flops["total_gflops"] * stage.steps * stage.batch_size,
        "train_s": train_s,
        "wall_s": time.time() - t0,
        "top1": 100 * ev["top1"],
        "top5": 100 * ev["top5"],
        "final_loss": losses[-1] if losses else None,
        "argv": argv,
        "fingerprint": fingerprint,
    }
    if not a.keep_checkpoints:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    checkpoints.atomic_write_text(json.dumps(r, indent=1), os.path.join(out, "result.json"))
    return r


def finished(a, c: Cell) -> dict | None:
    path = os.path.join(a.out, "cells", c.key, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- table and plots


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of one value is 0."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict]) -> list[dict]:
    """Cells -> one row per grid point (size, image px, text tokens, reduction): mean and std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["size"], r["image_px"], r["text_tokens"], r["reduction"]), []).append(r)
    order = {s: i for i, s in enumerate(TOY_SIZES)}
    rows = []
    for (size, px, t, red), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), *kv[0][1:])):
        top1, top1_std = mean_std([r["top1"] for r in rs])
        top5, top5_std = mean_std([r["top5"] for r in rs])
        rows.append(
            {
                "size": size,
                "model": rs[0]["model"],
                "image_px": px,
                "image_tokens": rs[0]["image_tokens"],
                "text_tokens": t,
                "reduction": red,
                "seeds": len(rs),
                "train_gflops": rs[0]["train_gflops"],
                "train_s": statistics.fmean(r["train_s"] for r in rs),
                "top1": top1,
                "top1_std": top1_std,
                "top5": top5,
                "top5_std": top5_std,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| size | model | tokens (img/text) | reduction | seeds | train GFLOPs | train s | top-1 % | top-5 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['model']} | I{r['image_tokens']}/T{r['text_tokens']} | {r['reduction']} | "
            f"{r['seeds']} | {r['train_gflops']:.0f} | {r['train_s']:.0f} | {r['top1']:.1f} +- {r['top1_std']:.1f} | "
            f"{r['top5']:.1f} +- {r['top5_std']:.1f} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    def fill(f):
        with open(f, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["size"])
            w.writeheader()
            w.writerows(rows)

    checkpoints.atomic_write(path, fill)


def axes(rows: list[dict], g: Grid) -> dict:
    """{'image': {size: [(tokens, row)]}, 'text': {...}}: the one-factor-at-a-time lines of the grid."""
    base = g.reductions[0]
    out = {"image": {}, "text": {}}
    for r in rows:
        if r["reduction"] != base:
            continue
        if r["text_tokens"] == g.ref_text and r["image_px"] in g.image_px:
            out["image"].setdefault(r["size"], []).append((r["image_tokens"], r))
        if r["image_px"] == g.ref_px and r["text_tokens"] in g.text_tokens:
            out["text"].setdefault(r["size"], []).append((r["text_tokens"], r))
    for lines in out.values():
        for pts in lines.values():
            pts.sort(key=lambda p: p[0])
    return out


def drops(rows: list[dict], g: Grid) -> dict:
    """Top-1 lost to fewer tokens: for each axis and size, (tokens, full - reduced, std of the difference)
    against the axis' largest budget; std combines both points' seed spreads."""
    out = {}
    for axis, lines in axes(rows, g).items():
        out[axis] = {}
        for size, pts in lines.items():
            full = pts[-1][1]
            out[axis][size] = [
                (t, full["top1"] - r["top1"], math.hypot(full["top1_std"], r["top1_std"])) for t, r in pts[:-1]
            ]
    return out


def plot(rows: list[dict], g: Grid, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(TOY_SIZES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    base = g.reductions[0]
    lines, lost = axes(rows, g), drops(rows, g)
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    titles = {
        "image": f"image tokens (T{g.ref_text}, {base})",
        "text": f"text tokens ({base}, {g.ref_px} px = I{(g.ref_px // PATCH) ** 2 + 1})",
    }
    for j, axis in enumerate(("image", "text")):
        for size, pts in lines[axis].items():
            name = f"{size}: {toy_model(size)}"
            x = [p[0] for p in pts]
            ax[0, j].errorbar(
                x,
                [p[1]["top1"] for p in pts],
                [p[1]["top1_std"] for p in pts],
                marker="o",
                capsize=3,
                label=name,
                color=colours.get(size),
            )
            d = lost[axis].get(size, [])
            if d:
                ax[1, j].errorbar(
                    [p[0] for p in d],
                    [p[1] for p in d],
                    [p[2] for p in d],
                    marker="o",
                    capsize=3,
                    label=name,
                    color=colours.get(size),
                )
        ticks = sorted({p[0] for pts in lines[axis].values() for p in pts})
        for i in (0, 1):
            ax[i, j].set_xscale("log", base=2)
            ax[i, j].set_xticks(ticks, [str(t) for t in ticks])
            ax[i, j].minorticks_off()
            ax[i, j].set_xlabel(titles[axis])
        ax[0, j].set_ylabel("zero-shot top-1 (%)")
        ax[1, j].set_ylabel("top-1 lost vs the longest (points)")
        ax[1, j].axhline(0, color="grey", lw=0.8)
        ax[0, j].legend(fontsize=7)
    n = max((r["seeds"] for r in rows), default=0)
    fig.suptitle(f"accuracy against token budget per model size (mean +- std over {n} seeds)", fontsize=10)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "inverse_scaling.png")]
    fig.savefig(paths[0], dpi=80)
    plt.close(fig)

    shorter = sorted({r["text_tokens"] for r in rows if r["image_px"] == g.ref_px and r["reduction"] != base})
    if shorter and len(g.reductions) > 1:
        sizes = [s for s in g.sizes if any(r["size"] == s for r in rows)]
        fig, ax = plt.subplots(1, len(sizes), figsize=(3.6 * len(sizes), 3.4), squeeze=False, sharey=True)
        width = 0.8 / len(g.reductions)
        for k, size in enumerate(sizes):
            a = ax[0, k]
            for i, red in enumerate(g.reductions):
                pts = {
                    r["text_tokens"]: r
                    for r in rows
                    if r["size"] == size and r["image_px"] == g.ref_px and r["reduction"] == red
                }
                xs = [x + (i - (len(g.reductions) - 1) / 2) * width for x in range(len(shorter))]
                a.bar(
                    xs,
                    [pts[t]["top1"] if t in pts else 0 for t in shorter],
                    width,
                    yerr=[pts[t]["top1_std"] if t in pts else 0 for t in shorter],
                    capsize=2,
                    label=red,
                )
            t_max = max(g.text_tokens)
            at = (size, g.ref_px, t_max, base)
            full = [r for r in rows if (r["size"], r["image_px"], r["text_tokens"], r["reduction"]) == at]
            if full:  # the untouched captions: what the reductions are cutting down from
                a.axhline(full[0]["top1"], color="grey", ls="--", lw=1, label=f"T{t_max} ({base})")
            a.set_xticks(range(len(shorter)), [f"T{t}" for t in shorter])
            a.set_title(f"{size}: {toy_model(size)}", fontsize=8)
        ax[0, 0].set_ylabel("zero-shot top-1 (%)")
        ax[0, 0].legend(fontsize=7)
        fig.suptitle(f"text reductions at {g.ref_px} px (mean +- std over {n} seeds)", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "text_reductions.png"))
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    return paths


def report(results: list[dict], g: Grid, out_dir: str) -> tuple[str, list[str]]:
    rows = aggregate(results)
    table = markdown(rows)
    checkpoints.atomic_write_text(table + "\n", os.path.join(out_dir, "results.md"))
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    blob = {"grid": asdict(g), "rows": rows, "drops": drops(rows, g), "cells": results}
    checkpoints.atomic_write_text(json.dumps(blob, indent=1), os.path.join(out_dir, "results.json"))
    return table, plot(rows, g, out_dir)


# ----------------------------------------------------------------------------- main


def show(results: list[dict], g: Grid, out_dir: str, t0: float) -> int:
    table, plots = report(results, g, out_dir)
    print(table)
    print(
        f"[sweep] wrote {out_dir}/results.md, results.csv, results.json and "
        f"{', '.join(os.path.basename(p) for p in plots)}; {len(results)} cells, total {clock(time.time() - t0)}",
        flush=True,
    )
    return 0


def clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def build_parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "sweep_out"))
    ap.add_argument("--sizes", default="S,M,L", help=f"toy model sizes, comma-separated ({', '.join(TOY_SIZES)})")
    ap.add_argument("--image-px", default="16,32,64", help="image sizes of the image axis (multiples of 8)")
    ap.add_argument("--text-tokens", default="4,8,16,32", help="text lengths of the text axis")
    ap.add_argument(
        "--reductions", default="syntax,truncate,frequency", help="text reductions; the first is the axes' own"
    )
    ap.add_argument("--ref-px", type=int, default=32, help="image size of the text axis")
    ap.add_argument("--ref-text", type=int, default=16, help="text length of the image axis")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per grid point (0, 1, ...)")
    ap.add_argument("--samples", type=int, default=6400, help="training samples per cell")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--factorial", action="store_true", help="the whole product instead of the two axes")
    ap.add_argument("--jobs", type=int, default=2, help="cells trained at once")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default: CPU cores / jobs)")
    ap.add_argument("--workers", type=int, default=0, help="data loader workers per training run")
    ap.add_argument("--n-train", type=int, default=10000, help="demo training pairs to generate")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="table and plots from the finished cells; no training")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        g = parse_grid(a)
    except ValueError as e:
        return cli.usage_error(e)
    if a.workers < 0 or (a.threads is not None and a.threads < 1) or a.n_train < a.batch_size:
        return cli.usage_error(
            f"--workers must be >= 0, --threads >= 1 and --n-train >= --batch-size "
            f"(got {a.workers}, {a.threads}, {a.n_train})"
        )
    if os.path.isfile(a.out):
        return cli.usage_error(f"--out {a.out} is a file, not a directory")
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    if a.report_only:  # whatever has finished, whichever code ran it: a look at a sweep still running
        results = [r for r in (finished(a, c) for c in cells(g)) if r is not None]
        if not results:
            return cli.usage_error(f"no finished cells of this grid in {a.out}")
        return show(results, g, a.out, t0)
    ds = demo_data.make_demo_dataset(os.path.join(a.out, "data"), n_train=a.n_train)
    templates = os.path.join(a.out, "templates.txt")
    checkpoints.atomic_write_text("{}\n", templates)
    dataset = {"n_train": ds.n_train, "n_val": ds.n_val, "templates": "{}"}
    counts = os.path.join(ds.root, "word_counts.json")
    stamp = os.path.join(ds.root, "demo_stamp.json")
    stale = not os.path.exists(counts) or os.path.getmtime(counts) < os.path.getmtime(stamp)
    if "frequency" in g.reductions and stale:
        # the frequency reduction's word counts, once per (re)generated training set
        cmd = [sys.executable, "data.py", "counts", ds.train_wds, "--out", counts]
        try:
            run_quiet(cmd, os.path.join(a.out, "counts.log"), a.threads)
        except RuntimeError as e:
            return cli.usage_error(e, 1)

    todo, results = [], []
    for c in cells(g):
        argv = train_argv(c, "DATA", a.samples, a.batch_size, "COUNTS") + ["--workers", str(a.workers)]
        key = demo.fingerprint(argv, dataset)
        prev = finished(a, c)
        if prev is not None and prev.get("fingerprint") == key:
            results.append(prev)
        else:
            todo.append((c, key))
    n_all = len(results) + len(todo)
    pred = {c.key: predicted_seconds(c, a.samples) for c, _ in todo}
    total_pred = sum(pred.values()) / a.jobs
    print(
        f"[sweep] {n_all} cells ({len(g.sizes)} sizes x {len({c.point for c in cells(g)}) // len(g.sizes)} points x "
        f"{len(g.seeds)} seeds): {len(results)} finished and reused, {len(todo)} to run with {a.jobs} at once "
        f"({a.threads} thread(s) each); predicted {clock(total_pred)} on an idle 2-core machine",
        flush=True,
    )
    failed, lock, done_pred, t_run = [], threading.Lock(), 0.0, time.time()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(run_cell, c, a, ds, templates, counts, key): c for c, key in todo}
        for n, fut in enumerate(as_completed(futures), 1):
            c = futures[fut]
            try:
                r = fut.result()
            except (RuntimeError, OSError, ValueError) as e:
                failed.append(c.key)
                print(f"[sweep] FAILED {c.key}: {cli.first_line(e)}", flush=True)
                continue
            with lock:
                results.append(r)
                done_pred += pred[c.key]
                elapsed = time.time() - t_run
                left = sum(pred[x.key] for x, _ in todo) - done_pred
                eta = left * elapsed / done_pred  # the prediction, scaled by the pace so far
            print(
                f"[sweep] {n}/{len(todo)} {c.key}: top-1 {r['top1']:.1f}% ({r['train_s']:.0f}s) | "
                f"elapsed {clock(elapsed)} | ETA {clock(eta)}",
                flush=True,
            )
    if not results:
        return cli.usage_error(f"no cell finished in {a.out}", 1)
    show(results, g, a.out, t0)
    if failed:
        return cli.usage_error(f"{len(failed)} cell(s) failed, e.g. {failed[0]} (rerun to retry them)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
