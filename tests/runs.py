"""Helpers shared by the tests: the environment and commands of the real scripts (train.py, finetune.py,
...) run as processes, a free port for a process group's rendezvous, the tiny demo run's arguments and
its metrics. Data makers live in tests/captioned.py."""

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors import safe_open

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# XLA on the CPU: cheaper compiles (the graphs are tiny; the default LLVM passes dominate)
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def env(**extra) -> dict:
    """The environment of a test's subprocess: the import path of pytest.ini (the scripts, launch/, tests/),
    one OpenMP thread (2 shared cores), cheap XLA compiles, the CPU unless PJRT_DEVICE is set; then extra."""
    path = os.pathsep.join(os.path.join(REPO, d) for d in (".", "launch", "tests"))
    e = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", XLA_FLAGS=FAST_XLA)
    e.setdefault("PJRT_DEVICE", "CPU")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(cmd, timeout=400, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(**extra), capture_output=True, text=True, timeout=timeout)


def train(args, timeout=400, script="train.py", **extra) -> str:
    p = run([PY, script, *args], timeout=timeout, **extra)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the OS picks it, so concurrent test runs do not
    meet on a fixed port (a process group's master binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out_dir):
    """({step: loss} with the last record of each step winning, all records) of a run's metrics."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, recs


def tiny_demo_args(demo, out, *extra):
    """Both demo stages at batch 16: 8 pre-train steps at 32 px, 4 masked fine-tune steps at 64 px."""
    return [
        "--cfg",
        "demo",
        "--workers",
        "1",
        "--batch-size",
        "16",
        "--train-data",
        demo.train_wds,
        "--set",
        "pretrain.train_num_samples=128",
        "--set",
        "finetune.train_num_samples=64",
        "--log-every",
        "1",
        "--save-every",
        "3",
        "--keep",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def same_weights(a, b) -> bool:
    """Whether two safetensors weight files hold the same tensors, bit for bit."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        keys = set(fa.keys())
        return keys == set(fb.keys()) and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)
