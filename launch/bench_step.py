"""Training-step throughput at CLIPA's token counts vs full length, side by side in one run.

    python launch/bench_step.py --device cuda --model ViT-B-16-CL16 --batch 256
    python launch/bench_step.py --device cpu --model ViT-Tiny-8-CL16-Syntax-GAP --batch 32

For each setting (image size, text context, mask ratio) it builds the model with model.py, runs
train.py's own train_step (uint8 batch -> device -> normalise -> both towers -> local contrastive
loss -> AdamW) on random data, and prints samples/s, the speedup over the full-length row and the
FLOPs counter's ratio. Settings are interleaved over rounds (best round kept) so machine noise
hits all rows alike.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import model as M  # noqa: E402
import train  # noqa: E402
import xla_utils  # noqa: E402


def parse_setting(text: str) -> tuple[int, int, float]:
    """'112/16' or '224/32/0.3' -> (image size, context length, mask ratio)."""
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"setting must be SIZE/CTX[/MASK], got {text!r}")
    return int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0


def main(argv=None) -> int:
    ap = xla_utils.ArgumentParser(prog="launch/bench_step.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16-CL16")
    ap.add_argument("--settings", default="224/32,112/16,224/32/0.3",
                    help="comma-separated SIZE/CTX[/MASK]; the first is the reference row")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=xla_utils.DEVICES)
    ap.add_argument("--precision", default="auto", choices=xla_utils.PRECISIONS)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--sequential", action="store_true",
                    help="one model in memory at a time (large models); no interleaving")
    a = ap.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in a.settings.split(",")]
        M.get_model_config(a.model)
    except ValueError as e:
        return xla_utils.usage_error(e)
    rt = xla_utils.init_runtime(a.device)
    precision = rt.precision(a.precision)
    print(f"# {rt.describe()} | {a.model} | batch {a.batch} | {precision}", flush=True)

    def build(size, ctx, mask):
        cfg = M.get_model_config(a.model, image_size=size, context_length=ctx,
                                 mask="random" if mask else "none", mask_ratio=mask)
        model = M.create_model(cfg).to(rt.device).train()
        if a.grad_checkpointing:
            model.set_grad_checkpointing(True)
        stage = train.Stage("bench", model=a.model, image_size=size, context_length=ctx, batch_size=a.batch)
        return {"cfg": cfg, "model": model, "opt": train.build_optimizer(model, stage, rt),
                "images": torch.randint(0, 256, (a.batch, 3, size, size), dtype=torch.uint8),
                "tokens": torch.randint(1, cfg.text.vocab_size, (a.batch, ctx)),
                "best": float("inf"), "setting": (size, ctx, mask)}

    def timed(r, steps):
        rt.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            train.train_step(rt, r["model"], r["opt"], r["images"], r["tokens"], 1e-5,
                             precision=precision)
            rt.step_boundary()
        rt.synchronize()
        return time.perf_counter() - t0

    def measure(group):
        for r in group:            # warm-up (and XLA compile) outside the timed rounds
            timed(r, 2)
        for _ in range(a.rounds):
            for r in group:
                r["best"] = min(r["best"], timed(r, a.steps) / a.steps)

    if a.sequential:
        runs = []
        for s in settings:
            r = build(*s)
            measure([r])
            r.update(model=None, opt=None)   # free the device before the next model
            runs.append(r)
            rt.release_memory()
    else:
        runs = [build(*s) for s in settings]
        measure(runs)

    ref = runs[0]
    ref_flops = M.count_flops(ref["cfg"], mask_ratio=ref["setting"][2])["total_gflops"]
    rows = []
    print(f"{'setting':>18s} {'img tokens':>10s} {'samples/s':>10s} {'speedup':>8s} {'FLOPs ratio':>11s}")
    for r in runs:
        size, ctx, mask = r["setting"]
        f = M.count_flops(r["cfg"], mask_ratio=mask)
        sps = a.batch / r["best"]
        row = {"image_size": size, "context_length": ctx, "mask_ratio": mask,
               "image_tokens": f["patches_kept"] + 1, "samples_per_s": sps,
               "speedup": ref["best"] / r["best"], "flops_ratio": ref_flops / f["total_gflops"]}
        rows.append(row)
        label = f"{size}px/T{ctx}" + (f"/{int(mask * 100)}%" if mask else "")
        print(f"{label:>18s} {row['image_tokens']:>10d} {sps:>10.1f} {row['speedup']:>7.2f}x "
              f"{row['flops_ratio']:>10.2f}x", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": rt.describe(), "model": a.model, "batch": a.batch,
                       "precision": precision, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
