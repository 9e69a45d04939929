"""Every launch wrapper's dry run resolves to the paper's recipe (docs/recipe.md)."""

import glob
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import bench_memory
import pytest

import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRAPPERS = sorted(
    glob.glob(os.path.join(ROOT, "launch", "gpu", "*.sh")) + glob.glob(os.path.join(ROOT, "launch", "tpu", "*.sh"))
)

# (preset, stage) -> (model, image size, global batch, peak lr, warmup, mask ratio): docs/recipe.md
RECIPE = {
    ("b16_i50_t16", "pretrain"): ("ViT-B-16-CL16", 112, 65536, 2.048e-3, 782, 0.0),
    ("b16_i50_t16", "finetune"): ("ViT-B-16-CL16", 224, 8192, 2.56e-5, 3072, 0.0),
    ("l16_i17_t16", "pretrain"): ("ViT-L-16-CL16-Syntax-GAP", 64, 32768, 1.024e-3, 1563, 0.0),
    ("l16_i17_t16", "finetune"): ("ViT-L-16-CL16-GAP", 224, 7168, 2.24e-5, 3571, 0.0),
    ("l16_i37_t8", "pretrain"): ("ViT-L-16-CL8-Syntax-GAP", 96, 32768, 1.024e-3, 1563, 0.0),
    ("l16_i37_t8", "finetune"): ("ViT-L-16-CL32-GAP", 224, 7168, 2.24e-5, 3571, 0.0),
    ("h14_i36_t8", "pretrain"): ("ViT-H-14-CL8-Syntax-GAP", 84, 65536, 2.048e-3, 782, 0.0),
    ("h14_i36_t8", "finetune"): ("ViT-H-14-CL32-GAP", 224, 32768, 5.12e-5, 800, 0.3),
    ("h14_v2", "pretrain"): ("ViT-H-14-CL8-Syntax-GAP", 84, 65536, 2.048e-3, 782, 0.0),
    ("h14_v2", "ft224"): ("ViT-H-14-CL32-GAP", 224, 32768, 5.12e-5, 800, 0.3),
    ("h14_v2", "ft336"): ("ViT-H-14-CL32-GAP", 336, 16384, 6.4e-6, 1600, 0.4),
    ("l14_v2", "pretrain"): ("ViT-L-14-CL32-GAP-BigVision", 84, 65536, 2.048e-3, 782, 0.0),
    ("l14_v2", "ft224"): ("ViT-L-14-CL32-GAP-BigVision", 224, 32768, 5.12e-5, 800, 0.3),
    ("l14_v2", "ft336"): ("ViT-L-14-CL32-GAP-BigVision", 336, 16384, 6.4e-6, 1600, 0.4),
}


def _run(path, env_extra, tmp):
    env = dict(os.environ, PYTHON=sys.executable, DRY_RUN="1", **env_extra)
    for k in ("TRAIN_DATA", "OUT", "PRETRAINED", "IMAGENET_VAL"):
        if k not in env_extra:
            env.pop(k, None)
    return subprocess.run(["bash", path], env=env, capture_output=True, text=True, timeout=300)


def test_every_preset_stage_has_gpu_and_tpu_wrappers():
    names = {os.path.relpath(p, os.path.join(ROOT, "launch")) for p in WRAPPERS}
    want = {f"{plat}/{preset}_{stage}.sh" for plat in ("gpu", "tpu") for preset, stage in RECIPE}
    assert names == want


@pytest.mark.slow
def test_dry_runs_resolve_to_the_paper_recipe(tmp_path):
    pre = tmp_path / "pretrained"
    pre.mkdir()
    env = {"TRAIN_DATA": "/data/laion/{00000..00009}.tar", "OUT": str(tmp_path / "out"), "PRETRAINED": str(pre)}
    with ThreadPoolExecutor(4) as pool:  # 28 interpreter starts: overlap them
        results = list(pool.map(lambda p: (p, _run(p, env, tmp_path)), WRAPPERS))
    for path, r in results:
        assert r.returncode == 0, f"{path}: {r.stderr}"
        plat = os.path.basename(os.path.dirname(path))
        preset, stage = os.path.basename(path)[:-3].rsplit("_", 1)
        lines = r.stdout.strip().splitlines()
        command = lines[0]
        assert command.startswith(
            "command: " + ("torchrun --nproc_per_node" if plat == "gpu" else f"{sys.executable} xla_utils.py launch")
        )
        assert f"--cfg {preset} --stage {stage}" in command
        assert "--resume auto" in command  # the same command continues after a preemption
        assert ("finetune.py" in command) == (stage != "pretrain")
        assert (f"--pretrained {pre}" in command) == (stage != "pretrain")
        resolved = json.loads(lines[-1])
        model, size, batch, lr, warmup, mask = RECIPE[(preset, stage)]
        assert resolved["name"] == stage
        assert resolved["model"] == model
        assert resolved["image_size"] == size
        assert resolved["batch_size"] == batch
        assert resolved["lr"] == pytest.approx(lr, rel=1e-9)
        assert resolved["warmup"] == warmup
        assert resolved["mask_ratio"] == mask
        assert resolved["train_data"] == env["TRAIN_DATA"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "missing,needle",
    [("TRAIN_DATA", "TRAIN_DATA is not set"), ("OUT", "OUT is not set"), ("PRETRAINED", "PRETRAINED is not set")],
)
def test_missing_paths_are_one_line_errors(tmp_path, missing, needle):
    env = {"TRAIN_DATA": "/data/x.tar", "OUT": str(tmp_path), "PRETRAINED": str(tmp_path)}
    del env[missing]
    r = _run(os.path.join(ROOT, "launch", "gpu", "l16_i37_t8_finetune.sh"), env, tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and needle in r.stderr


@pytest.mark.slow
def test_bench_step_prints_rows_for_every_setting(tmp_path):
    """One row per (setting, implementation, mode); token counts and FLOPs ratios from the counter;
    the same architecture in OpenCLIP runs the same step."""
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "bench_step.py"),
            "--device",
            "cpu",
            "--model",
            "ViT-Test-8-CL16",
            "--batch",
            "4",
            "--settings",
            "32/16,16/8,32/16/0.5",
            "--mode",
            "eager",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--optimizers",
            "foreach,fused",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    rows = res["rows"]
    assert [(x["impl"], x["image_size"], x["context_length"], x["mask_ratio"]) for x in rows] == [
        (i, *s) for s in [(32, 16, 0.0), (16, 8, 0.0), (32, 16, 0.5)] for i in ("ours", "openclip")
    ]
    assert [x["image_tokens"] for x in rows[::2]] == [17, 5, 9]  # 4x4 / 2x2 patches + CLS; half kept
    assert all(x["speedup"] == 1.0 and x["flops_ratio"] == 1.0 for x in rows[:2])
    assert rows[2]["flops_ratio"] > 1.0 and all(x["samples_per_s"] > 0 and x["mfu"] > 0 for x in rows)
    assert res["peak_matmul_tflops"] > 0 and len(res["summary"]) == 3
    assert "ours-best (eager) / OpenCLIP-best (eager)" in r.stdout
    # AdamW alone, both kernels over the model's parameters; the token-reduction goal beside the rows
    assert [o["optimizer"] for o in res["optimizers"]] == ["foreach", "fused"]
    built = model.CLIP(model.get_model_config("ViT-Test-8-CL16"))
    assert res["optimizers"][0]["params"] == sum(p.numel() for p in built.parameters())
    assert all(o["step_ms"] > 0 for o in res["optimizers"]) and res["optimizers"][0]["vs_first"] == 1.0
    assert [g["goal"].split(" (")[0] for g in res["goals"]] == [
        "token reduction realised 16px/T8",
        "token reduction realised 32px/T16",
    ]
    assert "# goal token reduction realised 16px/T8" in r.stdout and "AdamW step alone" in r.stdout
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "bench_step.py"), "--settings", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


@pytest.mark.slow
def test_bench_e2e_times_train_py_beside_the_step_alone(demo_small, tmp_path):
    """launch/bench_e2e.py: the real train.py (its logged samples/s after the skipped start-up) and
    the step alone at the stage's settings, their ratio and the goal; bad arguments are one line."""
    out = tmp_path / "e2e.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "bench_e2e.py"),
            "--train-data",
            demo_small.train_wds,
            "--batch-size",
            "16",
            "--workers",
            "1",
            "--steps",
            "4",
            "--skip",
            "2",
            "--log-every",
            "1",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    assert (res["cfg"], res["stage"], res["batch"], res["workers"]) == ("demo", "pretrain", 16, 1)
    assert len(res["train_py"]) == len(res["step_alone"]) == 1 and min(res["train_py"] + res["step_alone"]) > 0
    assert res["ratio"] == pytest.approx(res["train_py"][0] / res["step_alone"][0])
    assert 0 <= res["data_wait"][0] < 1 and "waiting for data" in r.stdout  # train.py's logged share
    assert "ViT-Tiny-8-CL16-Syntax-GAP 32px T16 batch 16" in r.stdout and "# goal train.py >= 0.9" in r.stdout
    for args, needle in ((["--stage", "nope"], "unknown stage"), (["--steps", "1000"], "fewer than")):
        bad = subprocess.run(
            [sys.executable, os.path.join(ROOT, "launch", "bench_e2e.py"), "--train-data", demo_small.train_wds, *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert bad.returncode == 2 and bad.stderr.startswith("error:") and needle in bad.stderr, bad.stderr


@pytest.mark.slow
def test_bench_memory_finds_the_largest_batch_that_fits(tmp_path):
    """launch/bench_memory.py: doubling then bisecting to the largest batch whose step does not run
    out of memory (within an eighth, multiples of 8); the CLI reports it with the planner's estimate."""
    tried = []

    def probe_below(n):
        def probe(b):
            tried.append(b)
            return {"b": b} if b <= n else None

        return probe

    batch, res = bench_memory.largest(probe_below(300), 64, 65536)
    assert res == {"b": batch} and batch % 8 == 0 and 300 - 300 // 8 <= batch <= 300
    assert tried[:4] == [64, 128, 256, 512] and len(tried) <= 8
    assert bench_memory.largest(probe_below(10), 64, 1024) == (0, None)
    assert bench_memory.largest(probe_below(10**9), 64, 1000)[0] == 512  # --limit reached
    out = tmp_path / "mem.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "bench_memory.py"),
            "--device",
            "cpu",
            "--model",
            "ViT-Test-8-CL16",
            "--setting",
            "32/16",
            "--start",
            "2",
            "--limit",
            "8",
            "--steps",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    assert res["max_batch"] == 8 and res["samples_per_s"] > 0 and res["planned_gb"] > 0
    assert res["peak_gb"] is None and "planner" in r.stdout  # the CPU has no allocator peak
