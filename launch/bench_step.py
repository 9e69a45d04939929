"""The training step, side by side in one run: this project vs OpenCLIP, eager vs compiled, full
length vs CLIPA's token counts, with samples/s, step time, peak memory and MFU.

    python launch/bench_step.py --device cuda --model ViT-L-16-CL8-Syntax-GAP --settings 224/32,96/8 \
        --batch 1024 --grad-checkpointing --json out.json
    python launch/bench_step.py --device cpu --model ViT-B-16-CL16 --layers 4 --settings 224/77,112/16 \
        --batch 16                                                       # the CPU comparison

Every row runs a full step (uint8 batch -> device -> normalise -> both towers -> contrastive loss ->
backward -> AdamW with the same flags) on random data. Rows are interleaved over rounds and the
median round is reported, so machine noise hits all rows alike. MFU = training FLOPs per sample
(model.py's forward count x 2 for multiply-adds x 3 for forward + backward) x samples/s over the
peak matmul rate measured in the same run (a large GEMM at the step's precision); HFU counts the
FLOPs the step executes: the recomputed forward too (x 4) when checkpointing, and fewer where a
tower of ours reads one row (CLS, EOT pooling: its last block runs that row alone, model.count_flops),
so our MFU can pass 100% of the GEMM rate: HFU is the one to hold against it. OpenCLIP
(open_clip_torch, a test requirement) builds the same architecture from export.openclip_model_cfg.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
import export  # noqa: E402
import factory  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
import transforms  # noqa: E402
import xla_utils  # noqa: E402

IMPLS = ("ours", "openclip")
MODES = ("eager", "compiled")
OPTIMIZERS = ("foreach", "fused", "compiled")
# the goals, printed beside the figures: (device kind, model prefix, setting, what, threshold)
GOALS = [
    ("cuda", "ViT-L-16", (96, 8), "mfu", 0.50),
    ("cuda", "ViT-B-16", (112, 16), "mfu", 0.45),
    ("cuda", "ViT-L-16", (96, 8), "vs_openclip", 1.3),
    ("cpu", "ViT-B-16", (112, 16), "vs_openclip", 1.2),
]
# token reduction realised: our best speed-up over our best full-length step / the FLOPs ratio
REALISED_GOAL = {"cuda": 0.8, "cpu": 0.9}


def parse_setting(text: str) -> tuple[int, int, float]:
    """'112/16' or '224/32/0.3' -> (image size, context length, mask ratio)."""
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"setting must be SIZE/CTX[/MASK], got {text!r}")
    return int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0


def peak_matmul_tflops(rt, precision: str) -> float:
    """The device's matmul rate at the step's precision, timed here (the MFU denominator)."""
    n = 8192 if rt.kind == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=rt.device, dtype=dtype)
    b = torch.randn(n, n, device=rt.device, dtype=dtype)
    times = []
    for _ in range(5):
        rt.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        rt.synchronize()
        times.append((time.perf_counter() - t0) / 4)
    return 2 * n**3 / min(times) / 1e12


class OpenCLIPStep(train.Step):
    """train.py's step around OpenCLIP's CLIP (its forward; the loss passed in): the reference row."""

    def _features(self, images, tokens):
        x = transforms.normalize(images, M.OPENAI_MEAN, M.OPENAI_STD)
        with self.rt.autocast(self.precision):
            image, text, scale = self.model(x, tokens)[:3]
        return losses.Features(image.float(), text.float(), scale.float(), None)


def openclip_loss():
    """OpenCLIP's ClipLoss, called on our Features."""
    from open_clip.loss import ClipLoss  # test requirement, only for this comparison

    loss = ClipLoss()

    def call(f: losses.Features):
        return loss(f.image, f.text, f.scale)

    return call


def build(a, rt, impl, mode, size, ctx, mask):
    cfg = M.get_model_config(
        a.model, image_size=size, context_length=ctx, mask="random" if mask else "none", mask_ratio=mask
    )
    if a.layers:
        cfg = replace(cfg, vision=replace(cfg.vision, layers=a.layers), text=replace(cfg.text, layers=a.layers))
    if impl == "ours":
        net = factory.create_model(cfg)
        loss = losses.ContrastiveLoss(cfg.loss, rt)
        step_class = train.Step
    else:
        import open_clip

        net = open_clip.CLIP(**export.openclip_model_cfg(cfg))
        loss = openclip_loss()
        step_class = OpenCLIPStep
    net = net.to(rt.device).train()
    net.set_grad_checkpointing(a.grad_checkpointing)
    stage = config.Stage(
        "bench", model=a.model, image_size=size, context_length=ctx, batch_size=a.batch, train_num_samples=a.batch
    )
    opt = train.build_optimizer(net, stage, rt)
    # compiled: as train.py --compile runs it (deterministic kernels on the CPU), for both
    step = step_class(rt, net, opt, loss, precision=rt.precision(a.precision), compiled=mode == "compiled")
    return {
        "impl": impl,
        "mode": mode,
        "setting": (size, ctx, mask),
        "cfg": cfg,
        "model": net,
        "step": step,
        "times": [],
        "images": torch.randint(0, 256, (a.batch, 3, size, size), dtype=torch.uint8),
        "tokens": torch.randint(1, cfg.text.vocab_size - 1, (a.batch, ctx)),
    }


def timed(rt, r, steps) -> float:
    rt.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        r["step"](r["images"], r["tokens"], 1e-5)
        rt.step_boundary()
    rt.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_optimizers(a, rt, cfg, kinds, rounds: int) -> list[dict]:
    """AdamW's step alone over the model's parameters (random gradients), each kind on its own copy,
    interleaved over rounds: torch's foreach and fused kernels, and the for-loop step torch.compile'd
    with a tensor lr (so a changing lr does not recompile). Returns rows with the median ms."""
    runs = {}
    for kind in kinds:
        torch.manual_seed(0)
        net = factory.create_model(cfg).to(rt.device)
        for p in net.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        groups = train.param_groups(net, 0.2)
        kw = dict(betas=(0.9, 0.95), eps=1e-6)
        if kind == "compiled":
            opt = torch.optim.AdamW(groups, lr=torch.tensor(1e-4), foreach=False, **kw)
            step = torch.compile(opt.step)
        else:
            opt = torch.optim.AdamW(groups, lr=1e-4, **{kind: True}, **kw)
            step = opt.step
        rt.synchronize()
        t0 = time.perf_counter()
        step()  # state creation (and compilation)
        rt.synchronize()
        runs[kind] = {"step": step, "first_s": time.perf_counter() - t0, "times": []}
    for _ in range(rounds):
        for r in runs.values():
            rt.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                r["step"]()
            rt.synchronize()
            r["times"].append((time.perf_counter() - t0) / 3)
    params = M.count_parameters(cfg, trainable=True)
    base = statistics.median(runs[kinds[0]]["times"])
    rows = [
        {
            "optimizer": k,
            "params": params,
            "step_ms": 1000 * statistics.median(r["times"]),
            "first_step_s": r["first_s"],
            "vs_first": base / statistics.median(r["times"]),
        }
        for k, r in runs.items()
    ]
    print(f"# AdamW step alone, {params / 1e6:.1f}M parameters (medians of {rounds} interleaved rounds)")
    for r in rows:
        print(
            f"{r['optimizer']:>10s} {r['step_ms']:9.1f} ms  first {r['first_step_s']:6.1f} s  "
            f"{r['vs_first']:5.2f}x {kinds[0]}"
        )
    return rows


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="launch/bench_step.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16-CL16")
    ap.add_argument(
        "--settings",
        default="224/32,112/16",
        help="comma-separated SIZE/CTX[/MASK]; the first is the full-length reference",
    )
    ap.add_argument(
        "--layers", type=int, default=0, help="blocks per tower (0: the model's; fewer compile faster on a CPU)"
    )
    ap.add_argument("--impl", default="ours,openclip", help="ours, openclip or both")
    ap.add_argument("--mode", default="eager,compiled", help="eager, compiled or both")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=xla_utils.DEVICES)
    ap.add_argument("--precision", default="auto", choices=xla_utils.PRECISIONS)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="one model in memory at a time (large models); rows are then not interleaved",
    )
    ap.add_argument(
        "--optimizers",
        default="",
        help=f"also time AdamW's step alone: comma-separated {', '.join(OPTIMIZERS)} (the first is the reference)",
    )
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in a.settings.split(",")]
        impls, modes = a.impl.split(","), a.mode.split(",")
        optimizers = [o for o in a.optimizers.split(",") if o]
        if set(impls) - set(IMPLS) or set(modes) - set(MODES) or set(optimizers) - set(OPTIMIZERS):
            raise ValueError(
                f"--impl takes {', '.join(IMPLS)}, --mode {', '.join(MODES)} and --optimizers {', '.join(OPTIMIZERS)}"
            )
        if a.batch < 1 or a.steps < 1 or a.rounds < 1 or a.layers < 0:
            raise ValueError("--batch, --steps and --rounds must be >= 1, --layers >= 0")
        for s in settings:
            M.check_config(M.get_model_config(a.model, image_size=s[0], context_length=s[1]))
        rt = xla_utils.init_runtime(a.device)
    except ValueError as e:
        return cli.usage_error(e)
    precision = rt.precision(a.precision)
    peak = peak_matmul_tflops(rt, precision)
    print(
        f"# {rt.describe()} | {a.model}{f' ({a.layers} blocks/tower)' if a.layers else ''} | batch "
        f"{a.batch} | {precision} | peak matmul {peak:.1f} TFLOP/s (measured)",
        flush=True,
    )

    keys = [(i, m, s) for s in settings for i in impls for m in modes]
    runs = []
    if a.sequential:
        for k in keys:
            r = build(a, rt, *k[:2], *k[2])
            r["compile_s"] = timed(rt, r, 1)
            rt.reset_peak_memory()
            timed(rt, r, 1)
            r["times"] = [timed(rt, r, a.steps) for _ in range(a.rounds)]
            r["peak_mem"] = rt.peak_memory()
            r.update(model=None, step=None)
            rt.release_memory()
            runs.append(r)
    else:
        runs = [build(a, rt, *k[:2], *k[2]) for k in keys]
        for r in runs:  # warm-up and compilation outside the timed rounds
            r["compile_s"] = timed(rt, r, 1)
            timed(rt, r, 1)
        for _ in range(a.rounds):
            for r in runs:
                r["times"].append(timed(rt, r, a.steps))
        for r in runs:
            r["peak_mem"] = None  # side by side: the allocator's peak is all rows together

    rows = []
    for r in runs:
        size, ctx, mask = r["setting"]
        f = M.count_flops(r["cfg"], mask_ratio=mask)
        step = statistics.median(r["times"])
        sps = a.batch / step
        flops = 2 * 3 * f["total_gflops"] * 1e9
        rows.append(
            {
                "impl": r["impl"],
                "mode": r["mode"],
                "image_size": size,
                "context_length": ctx,
                "mask_ratio": mask,
                "image_tokens": f["patches_kept"] + 1,
                "samples_per_s": sps,
                "step_ms": 1000 * step,
                "first_step_s": r["compile_s"],
                "peak_mem_gb": r["peak_mem"] / 2**30 if r["peak_mem"] else None,
                "gflops_fwd": f["total_gflops"],
                "mfu": flops * sps / (peak * 1e12),
                "hfu": 2
                * (4 if a.grad_checkpointing else 3)
                * 1e9
                * f["executed_gflops" if r["impl"] == "ours" else "total_gflops"]
                * sps
                / (peak * 1e12),
            }
        )
    ref = {
        (r["impl"], r["mode"]): r
        for r in rows
        if (r["image_size"], r["context_length"], r["mask_ratio"]) == settings[0]
    }
    for r in rows:
        base = ref[(r["impl"], r["mode"])]
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        r["flops_ratio"] = base["gflops_fwd"] / r["gflops_fwd"]
        r["realised"] = r["speedup"] / r["flops_ratio"]
    print(
        f"{'setting':>14s} {'impl':>8s} {'mode':>8s} {'tokens':>7s} {'samples/s':>10s} {'step ms':>8s} "
        f"{'1st step s':>10s} {'peak GB':>8s} {'MFU':>6s} {'HFU':>6s} {'speedup':>8s} {'FLOPs x':>8s} "
        f"{'realised':>8s}"
    )
    for r in rows:
        label = f"{r['image_size']}px/T{r['context_length']}" + (
            f"/{int(r['mask_ratio'] * 100)}%" if r["mask_ratio"] else ""
        )
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        print(
            f"{label:>14s} {r['impl']:>8s} {r['mode']:>8s} I{r['image_tokens']:<6d} {r['samples_per_s']:10.1f} "
            f"{r['step_ms']:8.1f} {r['first_step_s']:10.1f} {mem:>8s} {100 * r['mfu']:5.1f}% "
            f"{100 * r['hfu']:5.1f}% {r['speedup']:7.2f}x {r['flops_ratio']:7.2f}x {r['realised']:8.2f}"
        )
    summary = []
    for s in settings:
        best = {
            i: max(
                (r for r in rows if r["impl"] == i and (r["image_size"], r["context_length"], r["mask_ratio"]) == s),
                key=lambda r: r["samples_per_s"],
                default=None,
            )
            for i in IMPLS
        }
        if best["ours"] and best["openclip"]:
            ratio = best["ours"]["samples_per_s"] / best["openclip"]["samples_per_s"]
            summary.append(
                {
                    "setting": s,
                    "ours_best": best["ours"]["mode"],
                    "openclip_best": best["openclip"]["mode"],
                    "ours_vs_openclip": ratio,
                }
            )
            print(
                f"# {s[0]}px/T{s[1]}: ours-best ({best['ours']['mode']}) / OpenCLIP-best "
                f"({best['openclip']['mode']}) = {ratio:.2f}x"
            )
    goals = []
    for kind, prefix, s, what, want in GOALS:
        if kind != rt.kind or not a.model.startswith(prefix) or s not in [x[:2] for x in settings]:
            continue
        mine = [r for r in rows if r["impl"] == "ours" and (r["image_size"], r["context_length"]) == s]
        got = (
            max(r["mfu"] for r in mine)
            if what == "mfu"
            else next((x["ours_vs_openclip"] for x in summary if x["setting"][:2] == s), None)
        )
        if got is not None:
            goals.append((f"{prefix} {s[0]}px/T{s[1]} {what}", got, want))
    best = {
        s: max(
            (r for r in rows if r["impl"] == "ours" and (r["image_size"], r["context_length"], r["mask_ratio"]) == s),
            key=lambda r: r["samples_per_s"],
            default=None,
        )
        for s in settings
    }
    for s in settings[1:]:
        if best[s] and best[settings[0]] and rt.kind in REALISED_GOAL:
            realised = best[s]["samples_per_s"] / best[settings[0]]["samples_per_s"] / best[s]["flops_ratio"]
            goals.append(
                (
                    f"token reduction realised {s[0]}px/T{s[1]} (ours {best[s]['mode']} over ours "
                    f"{best[settings[0]]['mode']} at full length, / FLOPs ratio {best[s]['flops_ratio']:.2f}"
                    f"x)",
                    realised,
                    REALISED_GOAL[rt.kind],
                )
            )
    for what, got, want in goals:
        print(f"# goal {what} >= {want}: {got:.2f} ({'met' if got >= want else 'missed'})")
    opt_rows = bench_optimizers(a, rt, runs[0]["cfg"], optimizers, a.rounds) if optimizers else []
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "device": rt.describe(),
                    "model": a.model,
                    "layers": a.layers,
                    "batch": a.batch,
                    "precision": precision,
                    "peak_matmul_tflops": peak,
                    "rows": rows,
                    "optimizers": opt_rows,
                    "goals": [{"goal": w, "value": g, "threshold": t} for w, g, t in goals],
                    "summary": summary,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
