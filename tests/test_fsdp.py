"""--shard fsdp on CUDA/CPU: FSDP2 (torch.distributed.fsdp.fully_shard) with 2 gloo processes
starts from the weights DDP and one process start from and trains exactly what they train (losses,
updated weights), with gradient checkpointing, image masking, exact accumulation and the compiled
step; checkpoints hold full tensors (portable) and a kill-and-resume of train.py under FSDP continues
bit for bit. The models are built by train.build_stage, as the trainer builds them: seeding each
rank by hand would hide a rank that initialises differently."""

import os
import signal
import subprocess
import time

import pytest
import torch
from runs import PY, REPO, env, free_port, losses, tiny_demo_args
from safetensors.torch import load_file

import factory

# every variant in one launch (process start-up dominates on 2 cores): (name, shard, grad
# checkpointing, masking, accumulation steps, torch.compile'd step)
VARIANTS = [
    ("ddp", "none", False, False, 1, False),
    ("fsdp", "fsdp", False, False, 1, False),
    ("ddp_ckpt_mask", "none", True, True, 1, False),
    ("fsdp_ckpt_mask", "fsdp", True, True, 1, False),
    ("fsdp_accum2", "fsdp", True, False, 2, False),
]
# launched by their own test only: compiling costs a minute with a cold inductor cache
COMPILED = [("ddp_compiled", "none", False, False, 1, True), ("fsdp_compiled", "fsdp", False, False, 1, True)]

SCRIPT = r"""
import sys, torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
import config, train, xla_utils
args = [a for a in sys.argv[1:] if a not in ("--device", "cpu")]      # launch adds --device cpu
out, names, shards = args[0], args[1].split(","), args[2]
rt = xla_utils.init_runtime("cpu")
variants = [v for v in VARIANTS if v[0] in names]
g = torch.Generator().manual_seed(123)
images = torch.randint(0, 256, (3, 8, 3, 32, 32), dtype=torch.uint8, generator=g)
tokens = torch.randint(1, 49000, (3, 8, 16), generator=g)
per = 8 // rt.world_size
mine = slice(rt.rank * per, (rt.rank + 1) * per)       # this rank's rows of each global batch
res = {}
for name, shard, ckpt, mask, accum, compiled in variants:
    torch._dynamo.reset()                              # each variant compiles (and counts) its own graphs
    counters.clear()
    stage = config.Stage("t", model="ViT-Test-8-CL16", image_size=32, pos_embed="learnable", batch_size=8,
                         lr=2e-3, warmup=2, train_num_samples=8 * 100, train_data=shards,
                         **(dict(mask="random", mask_ratio=0.25) if mask else {}))
    run = config.RunConfig(cfg="demo", workers=0, seed=3, shard=shard, grad_checkpointing=ckpt,
                           accum_steps=accum, compile=compiled)
    # the trainer's path: seeds, model, DDP / FSDP wrapper, optimizer, step
    sr = train.build_stage(rt, run, 0, stage, init=None, state=None, resume_path=None)
    step, wm, opt = sr.train_step, sr.train_step.model, sr.train_step.optimizer
    m = sr.model
    rng = rt.all_gather_object(torch.get_rng_state())  # each rank's, as build_stage left it: the masks' draws
    # the full weights, gathered without the optimizer (full_state's FSDP optimizer state dict would
    # initialise AdamW's step counts); copies, as the steps update the parameters in place
    init = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in m.state_dict().items()}
    ls, graphs = [], []
    for i in range(3):
        loss = step(images[i][mine], tokens[i][mine], train.lr_at(i, stage))
        ls.append(float(rt.all_reduce_mean(loss.detach().clone())))
        graphs.append(counters["stats"]["unique_graphs"])
    weights, ostate = rt.full_state(wm, opt)
    sharded = [n for n, p in m.named_parameters() if hasattr(p, "to_local") and p.to_local().numel() < p.numel()]
    res[name] = {"losses": ls, "weights": weights, "fsdp": isinstance(wm, FSDPModule), "sharded": sharded,
                 "init": init, "rng": rng,
                 "exp_avg": {k: v["exp_avg"] for k, v in ostate.get("state", {}).items()},
                 "graphs": graphs, "graph_breaks": sum(counters["graph_break"].values())}
if rt.is_master:
    torch.save(res, out)
"""


def _script(tmp):
    script = tmp / "fsdp_step.py"
    script.write_text(f"VARIANTS = {VARIANTS + COMPILED!r}\n" + SCRIPT)
    return script


def _two_processes(script, out, variants, port, shards):
    """The named variants' results from SCRIPT on 2 gloo processes (shards: the loader's data)."""
    p = subprocess.run(
        [
            PY,
            "xla_utils.py",
            "launch",
            "--nproc",
            "2",
            "--master-port",
            str(port),
            str(script),
            str(out),
            ",".join(v[0] for v in variants),
            shards,
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory, demo_small):
    tmp = tmp_path_factory.mktemp("fsdp")
    script = _script(tmp)
    two = _two_processes(script, tmp / "two.pt", VARIANTS, port=free_port(), shards=demo_small.train_wds)
    one = tmp / "one.pt"
    p = subprocess.run(
        [PY, str(script), str(one), "ddp,ddp_ckpt_mask", demo_small.train_wds],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return two, torch.load(one, weights_only=True)


def _no_key_bias(name, t):
    """Attention's key bias has an exactly-zero true gradient; its float noise differs between
    reduction orders and Adam scales it up to +-lr, so it stays out of weight comparisons."""
    if name.endswith("attn.in_proj_bias"):
        w = t.shape[0] // 3
        return torch.cat([t[:w], t[2 * w :]])
    return t


def _same_weights(a, b, atol=1e-5):
    """Within atol, but for at most 1 element in 1000 of a tensor: Adam divides a gradient by its
    RMS, so where that is near eps another reduction order's float noise moves the weight by up to
    the lr (2e-3 in the scripts; one conv1 element of 6144 here with the picked last block)."""
    assert a.keys() == b.keys()
    for k in a:
        d = (_no_key_bias(k, a[k]) - _no_key_bias(k, b[k])).abs()
        assert d.max() <= 2e-3 and (d > atol).sum() <= d.numel() // 1000, (k, d.max(), (d > atol).sum())


def _bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_every_rank_starts_from_the_same_weights(results):
    """train.build_stage on 2 gloo processes: --shard fsdp starts from the very weights --shard none
    (DDP: rank 0's, broadcast) and one process start from, bit for bit. FSDP2 keeps each rank's own
    initialisation of its shard, so a model drawn from a per-rank seed would be a patchwork. The RNG
    build_stage leaves (the image masks' draws) differs between the ranks and is the same under DDP
    and FSDP."""
    two, one = results
    for plain, fsdp in (("ddp", "fsdp"), ("ddp_ckpt_mask", "fsdp_ckpt_mask"), ("ddp", "fsdp_accum2")):
        assert _bits(two[fsdp]["init"], two[plain]["init"]), (plain, fsdp)
    assert _bits(two["fsdp"]["init"], one["ddp"]["init"]) and _bits(two["ddp"]["init"], one["ddp"]["init"])
    for name in ("ddp", "fsdp", "ddp_ckpt_mask", "fsdp_ckpt_mask"):
        rng = two[name]["rng"]
        assert len(rng) == 2 and not torch.equal(rng[0], rng[1]), name
    for plain, fsdp in (("ddp", "fsdp"), ("ddp_ckpt_mask", "fsdp_ckpt_mask")):
        assert all(torch.equal(a, b) for a, b in zip(two[plain]["rng"], two[fsdp]["rng"]))


@pytest.mark.slow
def test_fsdp_really_shards(results):
    """Under FSDP every parameter but the scalar logit_scale (FSDP2 refuses scalars: replicated,
    its gradient averaged) is a DTensor of which each rank holds a part; the gathered weights
    have the model's full shapes."""
    two, _ = results
    assert two["fsdp"]["fsdp"] and not two["ddp"]["fsdp"]
    full = factory.create_model("ViT-Test-8-CL16").state_dict()
    assert set(two["fsdp"]["sharded"]) == set(full) - {"logit_scale"}
    assert {k: v.shape for k, v in two["fsdp"]["weights"].items()} == {k: v.shape for k, v in full.items()}


@pytest.mark.slow
@pytest.mark.parametrize("plain,fsdp", [("ddp", "fsdp"), ("ddp_ckpt_mask", "fsdp_ckpt_mask")])
def test_fsdp_equals_ddp(results, plain, fsdp):
    """Built by train.build_stage, same batches: FSDP's losses and updated weights are DDP's within
    1e-5 (with checkpointing and 25% random image masking too: the masks are drawn the same)."""
    two, _ = results
    assert two[fsdp]["losses"] == pytest.approx(two[plain]["losses"], abs=1e-5)
    assert two[fsdp]["losses"][-1] != two[fsdp]["losses"][0]
    _same_weights(two[fsdp]["weights"], two[plain]["weights"])


@pytest.mark.slow
def test_fsdp_equals_one_process(results):
    """2 FSDP ranks, each half of the global batch (gather-with-grad loss), and 2 FSDP ranks in
    2 exact-accumulation chunks, train what 1 process trains on the whole batch."""
    two, one = results
    assert two["fsdp"]["losses"] == pytest.approx(one["ddp"]["losses"], abs=1e-5)
    _same_weights(two["fsdp"]["weights"], one["ddp"]["weights"])
    assert two["fsdp_accum2"]["losses"] == pytest.approx(one["ddp"]["losses"], abs=1e-5)
    _same_weights(two["fsdp_accum2"]["weights"], one["ddp"]["weights"])


@pytest.mark.slow
def test_fsdp_optimizer_state_is_full_and_named(results):
    """The saved optimizer state (get_optimizer_state_dict, full_state_dict) holds full-size AdamW
    moments keyed by parameter name: the same numbers DDP's optimizer holds."""
    two, _ = results
    st = two["fsdp"]["exp_avg"]
    assert set(st) == set(two["fsdp"]["weights"])
    for k, v in st.items():
        assert v.shape == two["fsdp"]["weights"][k].shape, k


@pytest.mark.slow
def test_fsdp_compiled_step_equals_compiled_ddp(tmp_path, demo_small):
    """--shard fsdp --compile on 2 gloo processes: the step compiles on its first call and never
    again as the lr changes (FSDP2's hooks run eagerly between the graphs: dynamo skips them), and
    trains what compiled DDP trains, losses and updated weights within 1e-5 over 3 steps; its losses
    are eager DDP's within 1e-5 too. Weights are compared with compiled DDP's: inductor's sums differ
    from eager's in the last bits, which Adam scales up to +-lr where a gradient is near its eps."""
    variants = [VARIANTS[0]] + COMPILED  # eager DDP, compiled DDP, compiled FSDP
    two = _two_processes(
        _script(tmp_path), tmp_path / "two.pt", variants, port=free_port(), shards=demo_small.train_wds
    )
    fsdp, ddp = two["fsdp_compiled"], two["ddp_compiled"]
    assert fsdp["fsdp"] and not ddp["fsdp"]
    for run in (fsdp, ddp):
        graphs = run["graphs"]
        assert graphs == [graphs[0]] * 3 and graphs[0] >= 1, (graphs, run["graph_breaks"])
    assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    assert fsdp["losses"] == pytest.approx(two["ddp"]["losses"], abs=1e-5)
    assert fsdp["losses"][-1] != fsdp["losses"][0]
    _same_weights(fsdp["weights"], ddp["weights"])


def _launch(demo, out, *extra):
    """train.py --shard fsdp on 2 processes: both tiny demo stages."""
    return [
        PY,
        "xla_utils.py",
        "launch",
        "--nproc",
        "2",
        "--master-port",
        str(free_port()),
        "train.py",
        *tiny_demo_args(demo, out, "--shard", "fsdp", *extra),
    ]


def _descendants(pid):
    """Process ids below `pid` (from /proc), children first."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    kids = [p for p, pp in parent.items() if pp == pid]
    return [q for k in kids for q in _descendants(k)] + kids


def _ckpt(out):
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        return os.path.join(out, "checkpoints", f.read().strip())


@pytest.mark.slow
def test_train_py_fsdp_kill_and_resume_is_bit_exact(demo_small, tmp_path):
    """train.py --shard fsdp on 2 gloo processes, both demo stages (the second with 30% masking):
    SIGKILLed after step 5 (checkpoint of step 3) and resumed, it ends with the uninterrupted FSDP
    run's losses, weights and AdamW moments bit for bit; its weights file holds full tensors that
    factory.create_model loads."""
    full = tmp_path / "full"
    p = subprocess.run(_launch(demo_small, full), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _launch(demo_small, out),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoints" / "step_00000003").exists():
        time.sleep(0.05)
    # wait for step 5's record, then kill the launcher and both ranks
    while (
        time.time() < deadline
        and proc.poll() is None
        and 5 not in (losses(out)[0] if (out / "metrics.jsonl").exists() else {})
    ):
        time.sleep(0.05)
    for pid in _descendants(proc.pid) + [proc.pid]:  # the ranks run in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert os.path.basename(_ckpt(out)) == "step_00000003"
    p = subprocess.run(
        _launch(demo_small, out, "--resume", "latest"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    want, got = losses(full)[0], losses(out)[0]
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]
    a, b = _ckpt(out), _ckpt(full)
    assert os.path.basename(a) == os.path.basename(b) == "step_00000012"
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb)
    sa = torch.load(os.path.join(a, "train_state.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "train_state.pt"), weights_only=True)
    assert sa["world_size"] == 2 and set(sb["optimizer"]["state"]) == set(wb)  # keyed by name, full
    assert all(
        torch.equal(sa["optimizer"]["state"][k]["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])
        for k in sb["optimizer"]["state"]
    )
    m = factory.create_model("ViT-Tiny-8-CL32-GAP", image_size=64, pos_embed="learnable", pretrained=b)
    assert torch.equal(m.state_dict()["visual.proj"], wb["visual.proj"])


# ----------------------------------------------------------------------------- XLA SPMD

XLA_SCRIPT = r"""
import sys, torch
import torch_xla
import config, factory, losses, train, xla_utils
out, dev = sys.argv[1], sys.argv[2]
rt = xla_utils.init_runtime(dev)
torch.manual_seed(0)
m = factory.create_model("ViT-Test-8-CL16", pos_embed="learnable").to(rt.device).train()
stage = config.Stage("t", model="ViT-Test-8-CL16", image_size=32, batch_size=8, lr=2e-3, warmup=2,
                    train_num_samples=800)
wm = rt.wrap_model(m, "fsdp")
opt = train.build_optimizer(m, stage, rt)
step = train.Step(rt, wm, opt, losses.ContrastiveLoss("softmax", rt))
g = torch.Generator().manual_seed(123)
images = torch.randint(0, 256, (5, 8, 3, 32, 32), dtype=torch.uint8, generator=g)
tokens = torch.randint(1, 49000, (5, 8, 16), generator=g)
rec = {"losses": [], "compiles": [], "specs": {}, "state_specs": {}, "shapes": {}}
for i in range(5):
    loss = step(images[i], tokens[i], train.lr_at(i, stage))
    rt.add_step_closure(lambda l: rec["losses"].append(l.item()), (loss,))
    rt.step_boundary()
    rec["compiles"].append(rt.compile_count())
if rt.kind == "xla":
    for n, p in m.named_parameters():
        rec["specs"][n] = torch_xla._XLAC._get_xla_sharding_spec(p)
        rec["state_specs"][n] = torch_xla._XLAC._get_xla_sharding_spec(opt.state[p]["exp_avg"])
        rec["shapes"][n] = tuple(p.shape)
torch.save(rec, out)
"""


@pytest.mark.slow
def test_xla_spmd_fsdp_shards_every_parameter_and_matches_one_device(tmp_path):
    """--shard fsdp on XLA (PJRT CPU client, SPMD over 2 devices): every parameter with a dimension
    the device count divides is sharded over the mesh (its sharding spec names 2 devices), AdamW's
    moments too; the losses over 5 steps equal 1 XLA device's and the eager CPU's within 1e-4; the
    compile count stops growing after the second step."""
    script = tmp_path / "xla_fsdp.py"
    script.write_text(XLA_SCRIPT)
    recs = {}
    for tag, dev, n in (("xla2", "xla", 2), ("xla1", "xla", 1), ("cpu", "cpu", 1)):
        p = subprocess.run(
            [PY, str(script), str(tmp_path / f"{tag}.pt"), dev],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=env(CPU_NUM_DEVICES=n),
        )
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        recs[tag] = torch.load(tmp_path / f"{tag}.pt", weights_only=True)
    two = recs["xla2"]
    assert two["losses"] == pytest.approx(recs["xla1"]["losses"], abs=1e-4)
    assert two["losses"] == pytest.approx(recs["cpu"]["losses"], abs=1e-4)
    assert two["compiles"][1:] == [two["compiles"][1]] * 4, two["compiles"]
    for name, shape in two["shapes"].items():
        divisible = any(d % 2 == 0 for d in shape)
        for spec in (two["specs"][name], two["state_specs"][name]):
            assert ("devices=[" in spec and "0,1" in spec) == divisible, (name, shape, spec)
    assert two["specs"]["logit_scale"] == "{replicated}"
    assert all(s == "" or "replicated" in s or "devices" not in s for s in recs["xla1"]["specs"].values())
