"""train.py end to end against the bare step at the same settings: does the step wait for data?

    python launch/bench_e2e.py --train-data '/tmp/demo/train/wds/{00000..00009}.tar'   # the demo pre-train
    python launch/bench_e2e.py --cfg b16_i50_t16 --stage pretrain --batch-size 1024 --workers 12 \
        --device cuda --train-data '/data/laion400m/{00000..41455}.tar'

Each round runs the real train.py (loader workers, host-to-device copy, the step, logging, the
per-step agreed checks) for --skip + --steps steps in a subprocess and takes the median of its
logged samples/s after the first --skip steps (loader start-up, compilation); then it times the
step alone on one fixed random batch of the same shapes in this process (launch/bench_step.py's
timing). Rounds alternate the two, so machine noise hits both; medians over rounds are reported.
The goal: train.py within 10% of the step alone. The step-alone model stays on the
device while train.py runs: on one GPU, both must fit.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench_step  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
import factory  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
import xla_utils  # noqa: E402

GOAL = 0.9  # train.py's samples/s over the step alone's


def train_py_rate(argv: list[str], skip: int, steps: int, log_every: int) -> tuple[float, float]:
    """Run train.py once: the medians of its logged samples/s and data wait (the share of the time
    its loop waited for the next batch) after `skip` steps."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            *argv,
            "--out",
            out,
            "--max-steps",
            str(skip + steps),
            "--log-every",
            str(log_every),
            "--save-every",
            str(10**9),
            "--save-minutes",
            str(10**6),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"train.py failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
    recs = [r for r in recs if "samples_per_s" in r and r["stage_step"] > skip]
    if not recs:
        raise RuntimeError(f"train.py logged no step after step {skip}")
    return (statistics.median(r["samples_per_s"] for r in recs), statistics.median(r["data_wait"] for r in recs))


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="launch/bench_e2e.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cfg", default="demo", help="preset (train.py --cfg)")
    ap.add_argument("--stage", default="pretrain", help="the preset's stage to run")
    ap.add_argument("--train-data", required=True, help="training shards (train.py --train-data)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: the stage's)")
    ap.add_argument("--workers", type=int, default=2, help="data loader workers (train.py --workers)")
    ap.add_argument("--device", default="auto", choices=xla_utils.DEVICES)
    ap.add_argument("--compile", action="store_true", help="both with torch.compile (train.py --compile)")
    ap.add_argument("--steps", type=int, default=100, help="steps measured per round")
    ap.add_argument("--skip", type=int, default=40, help="train.py's first steps left out (start-up)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    args = (
        [
            "--cfg",
            a.cfg,
            "--stage",
            a.stage,
            "--train-data",
            a.train_data,
            "--workers",
            str(a.workers),
            "--device",
            a.device,
        ]
        + (["--batch-size", str(a.batch_size)] if a.batch_size else [])
        + (["--compile"] if a.compile else [])
    )
    try:
        if min(a.steps, a.rounds, a.log_every) < 1 or a.skip < 0 or a.workers < 0:
            raise ValueError("--steps, --rounds and --log-every must be >= 1, --skip and --workers >= 0")
        run, stages, _ = config.parse_args(args + ["--dry-run"])
        if len(stages) != 1:
            raise ValueError(f"--stage must name one stage of {a.cfg}")
        train.check_inputs(run, stages)
        stage = stages[0][1]
        if stage.steps < a.skip + a.steps:
            raise ValueError(f"stage {stage.name} has {stage.steps} steps, fewer than --skip + --steps")
        rt = xla_utils.init_runtime(a.device)
    except (ValueError, FileNotFoundError) as e:
        return cli.usage_error(e)
    precision = rt.precision(run.precision)
    cfg = stage.model_config()
    net = factory.create_model(cfg).to(rt.device).train()
    ctx = cfg.text.context_length
    bare = {
        "model": net,
        "step": train.Step(
            rt,
            net,
            train.build_optimizer(net, stage, rt),
            losses.ContrastiveLoss(stage.loss, rt),
            precision=precision,
            compiled=a.compile,
        ),
        "images": torch.randint(0, 256, (stage.batch_size, 3, stage.image_size, stage.image_size), dtype=torch.uint8),
        "tokens": torch.randint(1, cfg.text.vocab_size - 1, (stage.batch_size, ctx)),
    }
    bench_step.timed(rt, bare, 2)  # warm-up (and compilation)
    print(
        f"# {rt.describe()} | {a.cfg} {stage.name}: {stage.model} {stage.image_size}px T{ctx} batch "
        f"{stage.batch_size} | {a.workers} loader workers | {'compiled' if a.compile else 'eager'}",
        flush=True,
    )
    e2e, waits, alone = [], [], []
    for i in range(a.rounds):
        rate, wait = train_py_rate(args, a.skip, a.steps, a.log_every)
        e2e.append(rate)
        waits.append(wait)
        alone.append(stage.batch_size / bench_step.timed(rt, bare, a.steps))
        print(
            f"round {i + 1}: train.py {rate:.1f} samples/s (waiting for data {100 * wait:.1f}% of the "
            f"time), step alone {alone[-1]:.1f} samples/s",
            flush=True,
        )
    ratio = statistics.median(e2e) / statistics.median(alone)
    print(
        f"# median: train.py {statistics.median(e2e):.1f} samples/s, step alone "
        f"{statistics.median(alone):.1f} samples/s: {ratio:.2f}"
    )
    print(f"# goal train.py >= {GOAL} x the step alone: {ratio:.2f} ({'met' if ratio >= GOAL else 'missed'})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "device": rt.describe(),
                    "cfg": a.cfg,
                    "stage": stage.name,
                    "batch": stage.batch_size,
                    "workers": a.workers,
                    "compile": a.compile,
                    "train_py": e2e,
                    "data_wait": waits,
                    "step_alone": alone,
                    "ratio": ratio,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
