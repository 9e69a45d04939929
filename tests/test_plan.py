"""plan.py, the memory planner: its activation estimate against the peak memory a real step takes on
the CPU (tiny models, with and without checkpointing and masking), its choices, and the
`train.py --plan` table."""

import json
import subprocess

import pytest
from runs import PY, REPO, env, free_port, run

import config
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


def test_ring_bytes_and_fsdp_units():
    """Per rank, a ring all-gather or reduce-scatter moves (n-1)/n of the full tensor each way, an
    all-reduce twice that; FSDP2's units hold every trainable parameter once (the meta model agrees
    with count_parameters), and over n ranks each parameter gathers at most n-1 padding rows."""
    assert plan.moved("all_gather", 800, 8) == plan.moved("reduce_scatter", 800, 8) == 700
    assert plan.moved("all_reduce", 800, 8) == 1400 and plan.moved("send", 800, 8) == 800
    cfg = model.get_model_config("ViT-B-16-CL16", image_size=112)
    units, root, scalars = plan.fsdp_gathered(cfg, 1)
    assert sum(units) + root + scalars == model.count_parameters(cfg, trainable=True)
    assert len(units) == cfg.vision.layers + cfg.text.layers + 2 and root == 0 and scalars == 1
    padded = plan.fsdp_gathered(cfg, 512)[0]
    assert all(0 <= p - u < 512 * 50 * 768 for p, u in zip(padded, units, strict=True))
    assert padded[0] > units[0]  # a LayerNorm's 768 rows gather as 1,024 over 512 ranks


H100 = plan.Links(450e9, 50e9, 8)  # NVLink 4, one 400 Gb/s adapter per GPU, 8 GPUs a node


def test_communication_grows_past_the_compute_it_hides_behind():
    """B/16's fine-tune stage: at a fixed global batch, each GPU's compute shrinks with the GPU
    count while its gradient all-reduce does not: compute-bound on 8 GPUs, communication-bound on
    512. Within a node the network's bandwidth does not count; across nodes half of it doubles the
    time of the gradients' all-reduce (network-bound: 8 adapters at 25 GB/s < NVLink's 450)."""
    run, stages, _ = config.parse_args(["--cfg", "b16_i50_t16", "--stage", "finetune"])
    s = stages[0][1]
    cfg = s.model_config()

    def step(world, links=None):
        cs = plan.step_collectives(cfg, shard="none", world=world, per_rank=s.batch_size // world, bf16=True)
        flops = plan.flops_per_step(cfg, s.batch_size // world, s.mask_ratio)
        kw = dict(world=world, flops=flops, mfu=0.5, peak=989e12, links=links or H100)
        return cs, plan.comm_plan(cs, **kw)

    small, large = step(8)[1], step(512)[1]
    assert small.bound == "compute" and large.bound == "comm" and large.exposed > small.exposed
    assert small.sent["backward"] == pytest.approx(2 * 7 / 8 * 4 * model.count_parameters(cfg, trainable=True))
    slow = plan.Links(450e9, 25e9, 8)
    assert step(8, slow)[1].seconds == step(8)[1].seconds
    cs, fast = step(64)
    ar = next(c for c in cs if c.kind == "all_reduce" and c.phase == "backward")
    assert slow.seconds(ar, 64) == pytest.approx(2 * H100.seconds(ar, 64))


@pytest.mark.slow
def test_train_py_plan_prints_every_stage():
    p = run([PY, "train.py", "--cfg", "h14_v2", "--plan", "--gpu-mem", "80", "--devices", "8"], timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("memory plan: 8 device(s) x 80 GB")
    memory = lines[: lines.index("")]
    rows = [r for r in memory if r.startswith("| pretrain") or r.startswith("| ft")]
    assert [r.split("|")[1].strip() for r in rows] == ["pretrain", "ft224", "ft336"]
    assert all("--shard" in r and "--accum-steps" in r for r in rows)
    comm = lines[lines.index("") + 1 :]
    assert comm[0].startswith("communication per step") and "NVLink 450 GB/s, network 50 GB/s" in comm[0]
    assert [r.split("|")[1].strip() for r in comm[3:]] == ["pretrain", "ft224", "ft336"]
    p = run(
        [PY, "train.py", "--cfg", "b16_i50_t16", "--plan", "--devices", "512", "--network-gbs", "25", "--mfu", "0.4"],
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "network 25 GB/s per GPU, 8 GPUs per node; compute at 40% MFU" in p.stdout
    assert p.stdout.strip().splitlines()[-1].endswith("| comm |")  # the fine-tune stage at 512 GPUs
    p = run([PY, "train.py", "--cfg", "demo", "--plan", "--devices", "0"], timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: --devices must be >= 1, got 0"
    p = run([PY, "train.py", "--cfg", "demo", "--plan", "--mfu", "1.5"], timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: --mfu is a fraction of the peak, in (0, 1]; got 1.5"


# one optimizer step of train.Step on 2 gloo processes, its collectives counted by plan.CommCounter:
# (name, shard, loss, accumulation steps, gradient checkpointing, the sigmoid loss's ring)
COMM_VARIANTS = [
    ("ddp_softmax", "none", "softmax", 1, False, True),
    ("fsdp_softmax", "fsdp", "softmax", 1, False, True),
    ("ddp_sigmoid_accum2", "none", "sigmoid", 2, False, True),
    ("fsdp_sigmoid_accum2_ckpt", "fsdp", "sigmoid", 2, True, True),
    ("ddp_sigmoid_gather", "none", "sigmoid", 1, False, False),
]
COMM_STAGE = dict(model="ViT-Test-8-CL16", image_size=32, pos_embed="learnable", batch_size=8, lr=1e-3)

COUNT = r"""
import json, sys, torch
import config, factory, losses, plan, train, xla_utils
args = [a for a in sys.argv[1:] if a not in ("--device", "cpu")]      # launch adds --device cpu
rt = xla_utils.init_runtime("cpu")
per = 4  # samples per rank
images = torch.randint(0, 256, (per, 3, 32, 32), dtype=torch.uint8)
tokens = torch.randint(1, 49000, (per, 16))
res = {}


def written():  # bytes this process has passed to write() / writev(): gloo's TCP sends among them
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


for name, shard, loss, accum, ckpt, ring in VARIANTS:
    stage = config.Stage("t", loss=loss, train_num_samples=800, **STAGE)
    # as train.build_stage builds them: model, DDP / FSDP2 wrapper, AdamW, the step and its loss
    rt.seed(0)
    model = factory.create_model(stage.model_config())
    model.set_grad_checkpointing(ckpt)
    wm = rt.wrap_model(model.train(), shard, "fp32")
    step = train.Step(rt, wm, train.build_optimizer(model, stage, rt), losses.ContrastiveLoss(loss, rt, ring),
                      accum_steps=accum)
    # the third step: DDP broadcasts its rebuilt bucket order once, in the second
    for i in range(3):
        rt.barrier()
        before = written()
        with plan.CommCounter() as counter:
            step(images, tokens, 1e-3)
        wire = written() - before
    res[name] = {"payload": dict(counter.payload), "other": dict(counter.other), "sent": counter.sent(rt.world_size),
                 "wire": wire}
ranks = rt.all_gather_object(res)
if rt.is_master:
    json.dump(ranks, open(args[0], "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_planned_bytes_equal_the_bytes_a_step_moves(tmp_path, world):
    """What the planner says one step of train.Step sends per rank equals what its collectives
    moved, counted at the dispatcher on 2 and 3 gloo processes (payload per collective kind, and
    bytes sent by the ring definition): DDP's gradient all-reduce, FSDP2's parameter all-gathers
    (forward, and again for the backward) and gradient reduce-scatters, the softmax loss's feature
    gathers, the sigmoid ring's passes (and its gather form), with and without accumulation and
    checkpointing. Over 3
    ranks FSDP2 pads the parameters whose rows 3 does not divide (width 32: 33 rows gathered).
    And the counter counts what went out on the sockets: the bytes each process wrote during the
    step (Linux's per-process I/O count, gloo's TCP sends) are the counted bytes plus gloo's message
    headers (under 0.5%), once gloo's reduce-scatter is priced as what it sends: as much as an
    all-reduce of the whole tensor (twice a ring reduce-scatter's bytes)."""
    script = tmp_path / "count.py"
    script.write_text(f"VARIANTS = {COMM_VARIANTS!r}\nSTAGE = {COMM_STAGE!r}\n" + COUNT)
    out = tmp_path / "counts.json"
    p = subprocess.run(
        [PY, "xla_utils.py", "launch", "--nproc", str(world), "--master-port", str(free_port()), str(script), str(out)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == world
    for name, shard, loss, accum, _, ring in COMM_VARIANTS:
        cfg = config.Stage("t", loss=loss, train_num_samples=800, **COMM_STAGE).model_config()
        planned = plan.step_collectives(cfg, shard=shard, world=world, per_rank=4, accum=accum, ring=ring)
        payload = {}
        for c in planned:
            payload[c.kind] = payload.get(c.kind, 0) + c.payload
        sent = sum(plan.moved(c.kind, c.payload, world) for c in planned if c.kind != "recv")
        for rank in ranks:
            counted = rank[name]
            assert counted["other"] == {}, (name, counted["other"])
            assert counted["payload"] == payload, (name, counted["payload"], payload)
            assert counted["sent"] == pytest.approx(sent, rel=1e-12), name
            rs = payload.get("reduce_scatter", 0)
            gloo = sent - plan.moved("reduce_scatter", rs, world) + plan.moved("all_reduce", rs, world)
            assert gloo <= counted["wire"] <= 1.005 * gloo, (name, counted["wire"], gloo)
