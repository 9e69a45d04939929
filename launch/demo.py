"""CLIPA's trade-off on a laptop CPU, end to end, with no downloads.

    python launch/demo.py [--out demo_out] [--pretrain-samples 6400] [--finetune-samples 1600]
                          [--only KEY,...] [--workers 1] [--n-train 10000] [--n-val 1080] [--seeds 1]

1. launch/demo_data.py writes the embedded procedural dataset (webdataset tar + TFRecord shards, and a held-out
   ImageFolder zero-shot set of 36 "<colour> <shape>" classes).
2. The real scripts train each variant below on the same shards (train.py, which runs the preset's
   pre-train and fine-tune stages one after the other), then eval_zeroshot.py scores it.
3. A table (variant, image/text tokens, training GFLOPs, wall time, zero-shot top-1/top-5, image->text
   and text->image retrieval R@1 on the held-out images' captions) is printed
   and saved as JSON, with a PNG of loss curves and accuracy against compute. With --seeds N each
   variant is trained N times (seeds 0..N-1: weights and data order) and the table gives mean +- std.

Variants (the `demo` preset of train.py, changed only by command-line overrides):
- CLIPA: pre-train at 32 px (16 patches + CLS = I17) with 8 syntax-masked text tokens (T8), then a
  short fine-tune at 64 px / 32 tokens with 30% random image masking.
- CLIPA with the sigmoid (SigLIP) loss: the same schedule and compute, sigmoid instead of softmax
  contrastive loss in both stages (SigLIP's initial temperature and bias, the same lr).
- CLIPA with truncation: the same, but the 8 text tokens are the caption's first ones. Demo captions
  start with content-free lead-ins ("if you look very closely you will see ..."), so this shows why
  syntax masking matters at T8.
- Full-token baseline: 64 px (I65) / 32 tokens from scratch for the same number of samples as CLIPA's
  two stages together, so it spends more compute on the same data.
- The same baseline on CLIPA's compute budget: it sees as many samples as CLIPA's training FLOPs buy
  at full length (fewer samples, same FLOPs).
Training GFLOPs = 3 x forward GFLOPs per sample (model.py's counter, 1 multiply-add = 1 FLOP, so the
usual fwd+bwd = 3x fwd rule) x samples seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo_data  # noqa: E402  (launch/, beside this file)

import checkpoints  # noqa: E402
import cli  # noqa: E402
import config  # noqa: E402
import model as M  # noqa: E402

# A finished variant is reused only if it was trained by the same command with the same code: every
# module of the repository's top level (the scripts and what they import).
CODE = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))


@dataclass
class Variant:
    key: str
    label: str
    argv: list[str]  # train.py flags on top of --cfg demo


def variants(pre_samples: int, ft_samples: int, data: str, fmt: str) -> list[Variant]:
    common = [
        "--cfg",
        "demo",
        "--train-data",
        data,
        "--train-format",
        fmt,
        "--set",
        f"pretrain.train_num_samples={pre_samples}",
        "--set",
        f"finetune.train_num_samples={ft_samples}",
        "--set",
        "pretrain.context_length=8",
    ]

    def baseline(samples):  # fine-tune model/size/context from scratch, unmasked, pre-train lr
        return [
            "--cfg",
            "demo",
            "--stage",
            "finetune",
            "--train-data",
            data,
            "--train-format",
            fmt,
            "--set",
            "finetune.init=scratch",
            "--set",
            "finetune.mask=none",
            "--set",
            "finetune.mask_ratio=0.0",
            "--set",
            "finetune.pos_embed=sincos",
            "--set",
            "finetune.base_lr=0.016",
            "--set",
            "finetune.warmup=25",
            "--set",
            f"finetune.train_num_samples={samples}",
        ]

    vs = [
        Variant("clipa_syntax", "CLIPA: I17/T8 syntax -> I65(30% mask)/T32", common),
        Variant(
            "clipa_sigmoid",
            "CLIPA, sigmoid loss: I17/T8 -> I65(30%)/T32",
            common + ["--set", "pretrain.loss=sigmoid", "--set", "finetune.loss=sigmoid"],
        ),
        Variant(
            "clipa_trunc",
            "CLIPA: I17/T8 truncate -> I65(30% mask)/T32",
            common + ["--set", "pretrain.text_reduction=truncate"],
        ),
        Variant("baseline", "Baseline: I65/T32, same samples", baseline(pre_samples + ft_samples)),
    ]
    # the same baseline on CLIPA's compute budget: as many samples as CLIPA's FLOPs buy it
    clipa_gflops = tokens_and_flops(vs[0].argv)[1]
    per_sample = tokens_and_flops(baseline(32))[1] / 32
    n = max(32, int(clipa_gflops / per_sample) // 32 * 32)  # whole batches of 32
    vs.append(Variant("baseline_same_compute", "Baseline: I65/T32, CLIPA's compute", baseline(n)))
    return vs


def tokens_and_flops(argv: list[str]) -> tuple[list[str], float, int]:
    """Resolve a variant's stages with train.py's own parser -> (token strings, train GFLOPs, samples)."""
    _, stages, _ = config.parse_args(argv + ["--dry-run"])
    toks, gflops, samples = [], 0.0, 0
    for _, s in stages:
        cfg = M.get_model_config(s.model, image_size=s.image_size, context_length=s.context_length)
        f = M.count_flops(cfg, mask_ratio=s.mask_ratio)
        n_img = f["patches_kept"] + 1
        toks.append(f"I{n_img}/T{cfg.text.context_length}")
        n = s.steps * s.batch_size
        gflops += 3 * f["total_gflops"] * n
        samples += n
    return toks, gflops, samples


def run(cmd: list[str], log_path: str) -> float:
    """Run a real script, echoing its output with a prefix; returns wall seconds. Fails loudly."""
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PJRT_DEVICE", "CPU")
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            log.write(line)
            if line.strip():
                print("    " + line.rstrip(), flush=True)
        if p.wait() != 0:
            raise SystemExit(f"error: {' '.join(cmd[1:3])} failed (exit {p.returncode}); log: {log_path}")
    return time.time() - t0


def fingerprint(argv: list[str], dataset: dict) -> str:
    """What a variant's result depends on: its command, the dataset and the training code."""
    h = hashlib.sha256(json.dumps([argv, dataset]).encode())
    for name in CODE:
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curve(out: str) -> list[dict]:
    """Logged losses against cumulative samples ("samples" in metrics.jsonl counts per stage)."""
    curve, offset, stage, last = [], 0, None, 0
    for m in read_metrics(out):
        if "loss" not in m:
            continue
        if m["stage"] != stage:
            offset, stage = offset + last, m["stage"]
        last = m["samples"]
        curve.append({"samples_total": offset + m["samples"], "loss": m["loss"], "stage": stage})
    return curve


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        pts = [(m["samples_total"], m["loss"]) for m in r["curve"]]
        if pts:
            a.plot(*zip(*pts), label=r["label"])
        b.scatter(r["train_gflops"] / 1e3, r["top1"], s=40)
        b.annotate(
            r["key"], (r["train_gflops"] / 1e3, r["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    a.set_xlabel("samples seen")
    a.set_ylabel("contrastive loss")
    a.set_title("training loss")
    a.legend(fontsize=7)
    b.set_xlabel("training TFLOPs (multiply-adds)")
    b.set_ylabel("zero-shot top-1 (%)")
    b.set_title("accuracy against compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


METRICS = ("top1", "top5", "i2t_r1", "t2i_r1")


def eval_command(run_dir: str, ds, templates: str, out_json: str, workers: int, retrieval: bool) -> list[str]:
    """eval_zeroshot.py on the demo's held-out images (and, with retrieval, their captions) for the newest
    checkpoint of run_dir, on the CPU, writing its results to out_json."""
    cmd = [sys.executable, "eval_zeroshot.py", "--ckpt", checkpoints.resolve_checkpoint(run_dir), "--data", ds.val_dir]
    if retrieval:
        cmd += ["--retrieval", ds.val_captions]
    cmd += ["--classnames", os.path.join(ds.root, "classnames.txt"), "--templates", templates, "--device", "cpu"]
    return cmd + ["--out", out_json, "--no-progress", "--workers", str(workers)]


def train_and_score(a, ds, name: str, argv: list[str], row: dict) -> dict:
    """Train one variant with one seed (train.py) and score it (eval_zeroshot.py) in a.out/name, or reuse
    the finished run there when its command, data and code are unchanged."""
    out = os.path.join(a.out, name)
    done = os.path.join(out, "result.json")
    key = fingerprint(argv + ["--workers", str(a.workers)], {"n_train": ds.n_train, "n_val": ds.n_val})
    if os.path.exists(done):  # a second run reuses finished variants of the same command and code
        with open(done) as f:
            prev = json.load(f)
        if prev.get("fingerprint") == key:
            print("    reusing the finished run in " + out, flush=True)
            return dict(prev, curve=loss_curve(out))
    if os.path.exists(out):  # unfinished, or another command / code: start again, clean
        print("    starting again in " + out + " (unfinished, or its command or code changed)", flush=True)
        shutil.rmtree(out)
    train_cmd = [sys.executable, "train.py", *argv, "--out", out, "--workers", str(a.workers)]
    train_s = run(train_cmd + ["--log-every", "25", "--save-every", "100000"], os.path.join(a.out, name + ".log"))
    eval_json = os.path.join(out, "zeroshot.json")
    run(
        eval_command(out, ds, os.path.join(ds.root, "templates.txt"), eval_json, a.workers, retrieval=True),
        os.path.join(a.out, name + "_eval.log"),
    )
    with open(eval_json) as f:
        ev = json.load(f)
    r = {
        **row,
        "wall_s": train_s,
        "top1": 100 * ev["top1"],
        "top5": 100 * ev["top5"],
        "i2t_r1": 100 * ev["retrieval"]["image_to_text_R@1"],
        "t2i_r1": 100 * ev["retrieval"]["text_to_image_R@1"],
        "argv": argv,
        "fingerprint": key,
        "curve": loss_curve(out),
    }
    with open(done, "w") as f:
        json.dump(r, f, indent=1)
    return r


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="launch/demo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out"))
    ap.add_argument("--pretrain-samples", type=int, default=6400)
    ap.add_argument("--finetune-samples", type=int, default=1600)
    ap.add_argument("--only", default=None, help="comma-separated variant keys")
    ap.add_argument("--workers", type=int, default=1, help="data loader workers per training run")
    ap.add_argument("--n-train", type=int, default=10000, help="demo training pairs to generate")
    ap.add_argument("--n-val", type=int, default=1080, help="held-out images (a multiple of 36)")
    ap.add_argument("--seeds", type=int, default=1, help="runs per variant (seeds 0..N-1); N > 1: mean +- std")
    a = ap.parse_args(argv)
    keys = [v.key for v in variants(32, 32, "", "wds")]
    only = a.only.split(",") if a.only else keys
    for name, n in (
        ("--pretrain-samples", a.pretrain_samples),
        ("--finetune-samples", a.finetune_samples),
        ("--n-train", a.n_train),
        ("--n-val", a.n_val),
    ):
        if n < 32:
            return cli.usage_error(f"{name} must be >= 32 (one batch), got {n}")
    if a.seeds < 1:
        return cli.usage_error(f"--seeds must be >= 1, got {a.seeds}")
    if a.workers < 0 or a.n_val % 36:
        return cli.usage_error(f"--workers must be >= 0 and --n-val a multiple of 36 (got {a.workers}, {a.n_val})")
    if set(only) - set(keys):
        return cli.usage_error(f"unknown variant {sorted(set(only) - set(keys))[0]!r}; valid: {', '.join(keys)}")
    if os.path.isfile(a.out):
        return cli.usage_error(f"--out {a.out} is a file, not a directory")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    print(f"[demo] 1/3 embedded dataset -> {a.out}/data", flush=True)
    ds = demo_data.make_demo_dataset(os.path.join(a.out, "data"), n_train=a.n_train, n_val=a.n_val)
    print(
        f"[demo]     {ds.n_train} training pairs in webdataset + TFRecord shards, {ds.n_val} held-out "
        f"images in {len(ds.classnames)} classes ({time.time() - t0:.0f}s)",
        flush=True,
    )
    vs = [v for v in variants(a.pretrain_samples, a.finetune_samples, ds.train_wds, "wds") if v.key in only]
    results = []
    for i, v in enumerate(vs, 1):
        toks, gflops, samples = tokens_and_flops(v.argv)
        print(
            f"[demo] 2/3 variant {i}/{len(vs)}: {v.label} ({samples} samples, {gflops / 1e3:.1f} training TFLOPs)",
            flush=True,
        )
        runs = []
        for seed in range(a.seeds):  # seed 0 is the preset's own: its directory and command stay as they were
            name = v.key if seed == 0 else f"{v.key}_seed{seed}"
            argv = v.argv + (["--seed", str(seed)] if seed else [])
            runs.append(train_and_score(a, ds, name, argv, dict(key=v.key, label=v.label, tokens=" -> ".join(toks))))
            runs[-1].update(train_gflops=gflops, samples=samples, seed=seed)
        r = dict(runs[0])
        if a.seeds > 1:  # the row: mean and sample std over the seeds; each seed's figures beside them
            for m in METRICS:
                vals = [x[m] for x in runs]
                r[m], r[m + "_std"] = statistics.fmean(vals), statistics.stdev(vals)
            r["runs"] = [{k: x[k] for k in ("seed", "wall_s", *METRICS)} for x in runs]
        results.append(r)

    spread = a.seeds > 1
    w = 11 if spread else 6  # "21.7 +- 1.2"

    def cell(r, m, width):
        return f"{r[m]:.1f} +- {r[m + '_std']:.1f}".rjust(width) if spread else f"{r[m]:{width}.1f}"

    head = (
        f"{'variant':46s} {'tokens (img/text)':24s} {'train TFLOPs':>12s} {'wall s':>7s} {'top-1':>{w}s} "
        f"{'top-5':>{w}s} {'I->T R@1':>{max(w, 8)}s} {'T->I R@1':>{max(w, 8)}s}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['label']:46s} {r['tokens']:24s} {r['train_gflops'] / 1e3:12.1f} {r['wall_s']:7.0f} "
            + " ".join(cell(r, m, width) for m, width in zip(METRICS, (w, w, max(w, 8), max(w, 8))))
        )
    if spread:
        lines.append(f"(mean +- sample std over seeds 0..{a.seeds - 1}; wall s: seed 0)")
    table = "\n".join(lines)
    print(
        "[demo] 3/3 results: zero-shot on the held-out set "
        f"({ds.n_val} images, {len(ds.classnames)} classes, chance {100 / len(ds.classnames):.1f}%)\n"
    )
    print(table)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"results": results, "table": table}, f, indent=1)
    plot(results, os.path.join(a.out, "results.png"))
    print(f"\n[demo] wrote {a.out}/results.json and {a.out}/results.png; total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
