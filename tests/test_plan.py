"""plan.py, the memory planner: its activation estimate against the peak memory a real step takes on
the CPU (tiny models, with and without checkpointing and masking), its choices, and the
`train.py --plan` table."""

import subprocess

import pytest
from runs import PY, REPO, env

import model
import plan

MEASURE = r"""
import sys, model, plan
name, size, mask, batch, ckpt = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
cfg = model.get_model_config(name, image_size=size, **(dict(mask="random", mask_ratio=mask) if mask else {}))
print(plan.measured_peak(cfg, batch, checkpointing=ckpt))
"""


def _peak(tmp_path, name, size, mask, batch, ckpt):
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    # a fixed mmap threshold: every large tensor is its own mapping, returned on free, so the peak
    # resident size follows the live tensors instead of malloc's caching
    p = subprocess.run(
        [PY, str(script), name, str(size), str(mask), str(batch), str(int(ckpt))],
        cwd=REPO,
        env=env(MALLOC_MMAP_THRESHOLD_=65536),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,size,mask",
    [("ViT-Tiny-8-CL32-GAP", 64, 0.0), ("ViT-Tiny-8-CL32-GAP", 64, 0.3), ("ViT-Tiny-8-CL16-Syntax-GAP", 32, 0.0)],
)
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_activation_estimate_within_20_percent_of_measured_peak(tmp_path, name, size, mask, ckpt):
    """How far one forward + backward raises the resident memory (Linux's high-water mark, reset
    before the step) grows with the batch by what the planner estimates per sample (the difference
    of two batch sizes: the weight gradients cancel), within 20%."""
    small, large = 32, 160
    peaks = [_peak(tmp_path, name, size, mask, b, ckpt) for b in (small, large)]
    measured = (peaks[1] - peaks[0]) / (large - small)
    cfg = model.get_model_config(name, image_size=size, **(dict(mask="random", mask_ratio=mask) if mask else {}))
    est = plan.activation_bytes(cfg, mask_ratio=mask, checkpointing=ckpt, global_batch=0)
    assert abs(est - measured) / measured < 0.2, (est, measured, peaks)


def test_estimates_follow_tokens_checkpointing_and_sharding():
    cfg = model.get_model_config("ViT-H-14-CL32-GAP", image_size=224)
    plain = plan.activation_bytes(cfg, bf16=True)
    assert plan.activation_bytes(cfg, bf16=True, checkpointing=True) < plain / 5
    assert plan.activation_bytes(cfg, bf16=True, mask_ratio=0.5) < 0.6 * plain
    params = model.count_parameters(cfg, trainable=True)
    block = model.block_parameters(cfg.vision.width, int(cfg.vision.width * cfg.vision.mlp_ratio))  # the widest
    assert 950e6 < params < 1.0e9  # H/14: ~986M
    assert plan.state_bytes(cfg, shard="none", devices=8) == params * 16
    assert plan.state_bytes(cfg, shard="fsdp", devices=8) <= params * 16 / 8 + 16 * block
    assert plan.state_bytes(cfg, shard="fsdp", devices=1) == params * 16


def test_choices_fit_and_reach_the_global_batch():
    cfg = model.get_model_config("ViT-H-14-CL8-Syntax-GAP", image_size=84)
    for mem, devices in ((80, 8), (40, 8), (24, 4), (16, 64)):
        c = plan.choose(cfg, global_batch=65536, mask_ratio=0.0, gpu_mem=mem, devices=devices, bf16=True)
        assert c is not None, (mem, devices)
        assert c.per_device * devices == 65536 and c.micro * c.accum == c.per_device
        assert c.total_gb <= mem * plan.HEADROOM + 1e-9, c
    # replicated AdamW state of H/14 (~15 GB) does not fit in 16 GB: only sharding does
    small = plan.choose(cfg, global_batch=65536, mask_ratio=0.0, gpu_mem=16, devices=64, bf16=True)
    assert small.shard == "fsdp"
    assert plan.choose(cfg, global_batch=65536, mask_ratio=0.0, gpu_mem=4, devices=1, bf16=True) is None
    assert plan.choose(cfg, global_batch=100, mask_ratio=0.0, gpu_mem=80, devices=8, bf16=True) is None


@pytest.mark.slow
def test_train_py_plan_prints_every_stage():
    p = subprocess.run(
        [PY, "train.py", "--cfg", "h14_v2", "--plan", "--gpu-mem", "80", "--devices", "8"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("memory plan: 8 device(s) x 80 GB")
    rows = [r for r in lines if r.startswith("| pretrain") or r.startswith("| ft")]
    assert [r.split("|")[1].strip() for r in rows] == ["pretrain", "ft224", "ft336"]
    assert all("--shard" in r and "--accum-steps" in r for r in rows)
    p = subprocess.run(
        [PY, "train.py", "--cfg", "demo", "--plan", "--devices", "0"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.strip() == "error: --devices must be >= 1, got 0"
