"""train.py reading its shards from an S3 server against the same shards on local disk.

    python launch/bench_remote.py                       # the demo's pre-train stage, moto's S3 server
    python launch/bench_remote.py --rounds 5 --steps 60

It makes the demo data set (launch/demo_data.py), starts the S3 server the tests use (moto's, on
loopback: tests/servers.py) and uploads the shards with boto3. Rounds alternate a run of the real
train.py (loader workers, the step, logging) from local files and one from s3://, so machine noise hits
both; each run's median logged samples/s after --skip steps is taken, and the medians over rounds are
compared (goal: S3 within 10% of local). It also prints the median time to open a shard and read its
first bytes on each, the per-shard latency that the loader's next-shard prefetch (shards.read_shards)
hides. A loopback server adds no network round trip: see docs/data.md for what a real store adds.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bench_e2e  # noqa: E402
import demo_data  # noqa: E402
import servers  # noqa: E402

import cli  # noqa: E402
import shards  # noqa: E402

GOAL = 0.9  # S3's samples/s over local's


def open_latency(names: list[str]) -> float:
    """Median seconds to open a shard and read its first bytes."""
    times = []
    for name in names:
        t0 = time.perf_counter()
        with shards.open_shard(name) as f:
            assert f.head
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="launch/bench_remote.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="steps measured per run")
    ap.add_argument("--skip", type=int, default=10, help="each run's first steps left out (start-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="loader workers (train.py --workers)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    if min(a.steps, a.rounds, a.log_every) < 1 or a.skip < 0 or a.workers < 0:
        return cli.usage_error("--steps, --rounds and --log-every must be >= 1, --skip and --workers >= 0")
    with tempfile.TemporaryDirectory(prefix="clipa-bench-remote-") as work:
        demo = demo_data.make_demo_dataset(os.path.join(work, "demo"))
        names = shards.expand_braces(demo.train_wds)
        with servers.s3_server(work) as s3:
            client = servers.s3_client(s3)
            for p in names:
                client.upload_file(p, "clipa", os.path.relpath(p, demo.root))
            os.environ.update(s3.env)  # for this process's latency probe and train.py's environment
            remote = f"s3://clipa/{os.path.relpath(demo.train_wds, demo.root)}"
            common = ["--cfg", "demo", "--stage", "pretrain", "--workers", str(a.workers), "--device", "cpu"]
            print(f"# demo pre-train stage, {len(names)} shards, {a.workers} loader workers; S3: moto on loopback")
            rates: dict[str, list[float]] = {"local": [], "s3": []}
            for i in range(a.rounds):
                for where, spec in (("local", demo.train_wds), ("s3", remote)):
                    rate, wait = bench_e2e.train_py_rate([*common, "--train-data", spec], a.skip, a.steps, a.log_every)
                    rates[where].append(rate)
                    print(f"round {i + 1} {where}: {rate:.1f} samples/s (data wait {100 * wait:.1f}%)", flush=True)
            latency = {"local": open_latency(names), "s3": open_latency(shards.expand_braces(remote))}
    ratio = statistics.median(rates["s3"]) / statistics.median(rates["local"])
    print(
        f"# median: local {statistics.median(rates['local']):.1f} samples/s, S3 "
        f"{statistics.median(rates['s3']):.1f} samples/s: {ratio:.3f}"
    )
    print(
        f"# opening a shard (to its first bytes): local {1e3 * latency['local']:.2f} ms, S3 {1e3 * latency['s3']:.1f} ms"
    )
    print(f"# goal S3 >= {GOAL} x local: {ratio:.3f} ({'met' if ratio >= GOAL else 'missed'})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rates": rates, "ratio": ratio, "open_seconds": latency}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
