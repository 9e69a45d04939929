"""The largest per-device batch that fits one device, its speed, and the memory planner's estimate
beside the measured peak (H/14 at I36/T8 and bigG/14 at 70 px / T8 on one GPU).

    python launch/bench_memory.py --device cuda --model ViT-H-14-CL8-Syntax-GAP --setting 84/8 \
        --grad-checkpointing --json h14.json
    python launch/bench_memory.py --device cuda --model ViT-bigG-14-CL32-GAP-BigVision --setting 70/8 \
        --grad-checkpointing

The batch doubles from --start until the step runs out of device memory (torch.OutOfMemoryError),
then is bisected to within an eighth (in multiples of 8). At the largest batch that ran: samples/s,
MFU (as launch/bench_step.py), the allocator's peak, and plan.py's estimate of the same (weights,
gradients, AdamW states + batch x activations per sample; no CUDA context), with their ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench_step  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import model as M  # noqa: E402
import plan  # noqa: E402
import xla_utils  # noqa: E402


def largest(probe, start: int, limit: int):
    """(batch, probe's result) for the largest batch <= limit whose probe(batch) is not None
    (None: it did not fit): doubling from start, then bisecting to within an eighth, in multiples
    of 8 above 8. (0, None) when not even `start` fits."""
    lo, best, hi = 0, None, None
    b = start
    while b <= limit:
        res = probe(b)
        if res is None:
            hi = b
            break
        lo, best = b, res
        b *= 2
    while hi is not None and lo and hi - lo > max(8, lo // 8):
        mid = (lo + hi) // 2 // 8 * 8
        res = probe(mid)
        lo, best, hi = (mid, res, hi) if res is not None else (lo, best, mid)
    return lo, best


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="launch/bench_memory.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-H-14-CL8-Syntax-GAP")
    ap.add_argument("--setting", default="84/8", help="SIZE/CTX[/MASK] of the step")
    ap.add_argument("--layers", type=int, default=0, help="blocks per tower (0: the model's)")
    ap.add_argument("--start", type=int, default=64, help="first per-device batch tried")
    ap.add_argument("--limit", type=int, default=65536, help="largest per-device batch tried")
    ap.add_argument("--steps", type=int, default=3, help="timed steps at each batch")
    ap.add_argument("--device", default="auto", choices=xla_utils.DEVICES)
    ap.add_argument("--precision", default="auto", choices=xla_utils.PRECISIONS)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="the compiled step (default eager)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        size, ctx, mask = bench_step.parse_setting(a.setting)
        if min(a.start, a.limit, a.steps) < 1 or a.layers < 0:
            raise ValueError("--start, --limit and --steps must be >= 1, --layers >= 0")
        M.check_config(M.get_model_config(a.model, image_size=size, context_length=ctx))
        rt = xla_utils.init_runtime(a.device)
    except ValueError as e:
        return cli.usage_error(e)
    precision = rt.precision(a.precision)
    peak = bench_step.peak_matmul_tflops(rt, precision)
    mode = "compiled" if a.compile else "eager"

    def probe(batch: int) -> dict | None:
        """The step at this per-device batch (its time and the allocator's peak), None if out of memory."""
        r = None
        try:
            r = bench_step.build(argparse.Namespace(**{**vars(a), "batch": batch}), rt, "ours", mode, size, ctx, mask)
            bench_step.timed(rt, r, 1)  # AdamW's state (and compilation)
            rt.reset_peak_memory()
            sec = bench_step.timed(rt, r, a.steps)
            out = {"step_s": sec, "peak": rt.peak_memory(), "cfg": r["cfg"]}
            print(f"batch {batch}: {batch / sec:.1f} samples/s", flush=True)
            return out
        except torch.OutOfMemoryError:
            print(f"batch {batch}: out of memory", flush=True)
            return None
        finally:
            del r
            gc.collect()
            rt.release_memory()

    print(
        f"# {rt.describe()} | {a.model} {size}px/T{ctx}{f'/{mask}' if mask else ''} | {precision} | "
        f"{'checkpointing' if a.grad_checkpointing else 'no checkpointing'} | {mode}",
        flush=True,
    )
    batch, res = largest(probe, a.start, a.limit)
    if res is None:
        print(f"# not even batch {a.start} fits")
        return 1
    cfg = res["cfg"]
    f = M.count_flops(cfg, mask_ratio=mask)
    sps = batch / res["step_s"]
    mfu = 2 * 3 * f["total_gflops"] * 1e9 * sps / (peak * 1e12)
    bf16 = precision == "bf16"
    est = plan.state_bytes(cfg, shard="none", devices=1, bf16=bf16) + batch * plan.activation_bytes(
        cfg, mask_ratio=mask, checkpointing=a.grad_checkpointing, bf16=bf16, global_batch=batch
    )
    row = {
        "model": a.model,
        "setting": [size, ctx, mask],
        "max_batch": batch,
        "samples_per_s": sps,
        "mfu": mfu,
        "peak_gb": res["peak"] / plan.GB if res["peak"] else None,
        "planned_gb": est / plan.GB,
        "checkpointing": a.grad_checkpointing,
        "mode": mode,
        "device": rt.describe(),
    }
    measured = f"{row['peak_gb']:.1f} GB" if row["peak_gb"] else "not measured on this device"
    ratio = f" ({row['planned_gb'] / row['peak_gb']:.2f}x)" if row["peak_gb"] else ""
    print(
        f"# largest batch {batch}: {sps:.1f} samples/s, MFU {100 * mfu:.1f}% | peak {measured}, planner "
        f"{row['planned_gb']:.1f} GB{ratio}"
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(row, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
