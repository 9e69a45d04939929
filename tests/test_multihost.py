"""Multi-host XLA (one process per host, SPMD over the devices of every host) without a pod.

PJRT's CPU client runs one host only, so the two halves are checked apart: the mesh transport of
Runtime.all_gather_object / agree_each / barrier (_sum_over_hosts) and full_state's replicated
copies run for real on 2 CPU devices of one host; the per-host data and checkpoint logic runs in
two processes that each play one host of a 2-host pod, where only the cross-host reduction is
simulated. Each host must save its own loader position and RNG state and resume from them."""

import subprocess

import pytest
import torch
from runs import PY, REPO, env, free_port

pytestmark = pytest.mark.slow

MESH_SCRIPT = r"""
import dataclasses, sys, torch, torch_xla
import torch_xla.distributed.spmd as xs
import data, xla_utils
out, shards = sys.argv[1], sys.argv[2]
rt = xla_utils.init_runtime("xla")                 # one host, SPMD over its 2 devices
spec = torch_xla._XLAC._get_xla_sharding_spec
placed, marked = [], []                            # spies: what went to the mesh, what was marked
to_device, mark = rt.to_device, xs.mark_sharding
rt.to_device = lambda *t: placed.append(to_device(*t)[0]) or placed[-1:]
xs.mark_sharding = lambda t, *a: marked.append(t) or mark(t, *a)
res = {}

# the whole mesh path of all_gather_object (world size 1: this process is the only host)
rt.seed(3)
loader = data.make_train_loader(shards, None, 32, 4, num_workers=0, rank=0, world_size=1)
it = iter(loader)
next(it), next(it)
objs = [rt.rng_state(), loader.state_dict(), {"x": torch.tensor([-0.0, float("nan"), 1e-30])}]
res["objs"], res["gathered"] = objs, [rt._gather_over_mesh(o) for o in objs]
res["placed"] = [(tuple(t.shape), spec(t)) for t in placed]
res["marked"] = [spec(t) for t in marked]

# host 1 of a simulated pod of 2 hosts with 2 devices each: its block of the batch-sharded tensor
# (minibatch sharding puts every host's block on its own devices), reduced on the 2 real devices:
# host 1's share of the pod-wide sum
placed.clear()
rt1 = dataclasses.replace(rt, rank=1, world_size=2, num_devices=4)
rt1.to_device = rt.to_device                       # the block as it is over the 2 devices
x = torch.tensor([[5, -7, 2**31 - 1]], dtype=torch.int32)
res["host1_sum"] = rt1._sum_over_hosts(x)
res["host1_block"] = placed[0].cpu()
res["host1_agree"] = (rt1.agree_each([True, False]), rt1.agree(False), rt1.barrier())
res["host1_placed"] = [tuple(t.shape) for t in placed[1:]]

# full_state as a pod runs it: parameters and AdamW moments sharded over the mesh (--shard fsdp)
m = torch.nn.Linear(4, 6).to(rt.device)
m.register_parameter("scale", torch.nn.Parameter(torch.tensor(0.5, device=rt.device)))
m.register_buffer("zero", torch.tensor([-0.0, 1.0], device=rt.device))
rt.wrap_model(m, "fsdp")
opt = torch.optim.AdamW(m.parameters(), lr=0.1, capturable=True)
for p in m.parameters():
    p.grad = torch.full_like(p, -0.5)
opt.step()
torch_xla.sync()
res["param_specs"] = {n: spec(p) for n, p in m.named_parameters()}
res["one_host"] = rt.full_state(m, opt)
marked.clear()
res["pod"] = [dataclasses.replace(rt, rank=r, world_size=2).full_state(m, opt) for r in (0, 1)]
res["copies"] = [spec(t) for t in marked]
torch.save(res, out)
"""


def _bits(a, b) -> bool:
    """a and b hold the same values bit for bit (tensors: dtype, shape and bytes; NaN == NaN)."""
    if torch.is_tensor(a):
        return (
            torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.numpy().tobytes() == b.numpy().tobytes()
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_bits(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_mesh_transport_and_replicated_copies_on_two_devices(demo_small, tmp_path):
    """On 2 PJRT CPU devices of one host, for real: all_gather_object's mesh path (torch.save bytes,
    the byte counts agreed, each host's words in its row, placed batch-sharded over both devices,
    summed into a replicated tensor, read back with weights_only) returns an RNG state, a loader
    state and a tensor with -0.0 / NaN bit for bit. A host of a simulated 2-host pod (2 devices
    each) passes its rows on its first device and zeros on its second, which the 2 real devices
    reduce to its rows; its agree_each / agree / barrier are one such reduction each (the other
    hosts' blocks are not simulated). full_state on a pod makes a replicated copy of every
    parameter and AdamW moment (sharded by --shard fsdp) and the master's weights equal the
    one-host ones bit for bit; the other host runs the same copies and keeps nothing."""
    out = tmp_path / "mesh.pt"
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    p = subprocess.run(
        [PY, str(script), str(out), demo_small.train_wds],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env(CPU_NUM_DEVICES=2),
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = torch.load(out, weights_only=True)

    objs, gathered = res["objs"], res["gathered"]
    assert objs[1]["batches"] == 2 and "torch" in objs[0] and "xla" in objs[0]
    assert all(_bits(g, [o]) for g, o in zip(gathered, objs))
    # two reductions per gather: the byte counts [1], then [1 host, words] (a power of two)
    for shape, s in res["placed"]:
        assert shape[0] == 2 and s == "{devices=[2" + ",1" * (len(shape) - 1) + "]0,1}", (shape, s)
    assert [shape[1:] for shape, _ in res["placed"][0::2]] == [(1,)] * 3
    assert all(
        len(shape) == 3 and shape[1] == 1 and shape[2] & (shape[2] - 1) == 0 for shape, _ in res["placed"][1::2]
    ), res["placed"]
    assert res["marked"] == ["{replicated}"] * 6

    block = res["host1_block"]
    assert block.shape == (2, 1, 3) and block[0].tolist() == [[5, -7, 2**31 - 1]] and not block[1].any()
    assert res["host1_sum"].tolist() == [[5, -7, 2**31 - 1]]
    # agree_each, agree and barrier on a pod: one such reduction each
    assert res["host1_agree"] == ([True, False], False, None)
    assert res["host1_placed"] == [(2, 2), (2, 1), (2, 1)]

    specs = res["param_specs"]
    assert specs["weight"] == "{devices=[2,1]0,1}" and specs["bias"] == "{devices=[2]0,1}", specs
    weights, opt_state = res["one_host"]
    assert set(weights) == {"weight", "bias", "scale", "zero"} and len(opt_state["state"]) == 3
    (w0, o0), (w1, o1) = res["pod"]
    assert _bits(w0, weights) and _bits(o0, opt_state) and (w1, o1) == ({}, {})
    assert str(w0["zero"][0].item()) == "-0.0"  # the copy keeps the signed zero
    # each host copied 4 state tensors and 3 x (step, exp_avg, exp_avg_sq), all replicated
    assert res["copies"] == ["{replicated}"] * 26, res["copies"]


HOST_SCRIPT = r"""
import datetime, os, random, sys, torch
import torch.distributed as dist
import torch_xla.runtime as xr
import config
import train, xla_utils
rank, port, shards, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
# this process plays host `rank` of a 2-host pod: torch_xla reports that process index and count
xr.process_index, xr.process_count = (lambda: rank), (lambda: 2)
rt = xla_utils.init_runtime("xla")
assert (rt.rank, rt.world_size, rt.spmd) == (rank, 2, True)
# the simulated part: the cross-host reduction through the mesh is a gloo all-reduce between the
# host processes (one PJRT CPU client cannot span processes)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=120))   # a host that died fails the other
def pod_sum(x):
    x = x.clone()
    dist.all_reduce(x)
    return x
rt._sum_over_hosts = pod_sum

run = config.RunConfig(cfg="demo", out=out, workers=0, seed=5)
stage = config.Stage("pretrain", model="ViT-Test-8-CL16", image_size=32, batch_size=8,
                    train_num_samples=8 * 100, train_data=shards)
sr = train.build_stage(rt, run, 0, stage, init=None, state=None, resume_path=None)
for _ in range(3):
    next(sr.batches)
torch.rand(3), random.random()                    # the RNG moved on since build_stage seeded it
st = {"step": 3, "stage_index": 0, "stage_name": stage.name, "stage_step": 3, "samples": 24,
      "config": "{}", "data": sr.loader.state_dict(), "stage_ends": []}
mine = rt.rng_state()
train.save_checkpoint(rt, run, sr.train_step.model, sr.train_step.optimizer, st, stage)   # the real code path
want = [next(sr.batches) for _ in range(2)]       # the uninterrupted loader's next batches

ckpt = os.path.join(train.checkpoint_root(out), "step_00000003")
ts = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)
res = {"mine": mine, "want": want, "saved": {k: ts[k] for k in ("world_size", "rng", "data")}}
# resume as the trainer does, from every host's entries, then from host 0's only (before the fix)
for key, state in (("resumed", ts), ("host0_only", dict(ts, rng=ts["rng"][:1], data=ts["data"][:1]))):
    back = train.build_stage(rt, run, 0, stage, init=None, state=state, resume_path=ckpt)
    res[key] = {"rng": rt.rng_state(), "batches": [next(back.batches) for _ in range(2)]}
torch.save(res, os.path.join(out, f"host{rank}.pt"))
rt.barrier()
dist.destroy_process_group()
"""


def test_each_host_saves_and_resumes_its_own_loader_position_and_rng(demo_small, tmp_path):
    """Two processes, each host r of a simulated 2-host pod: torch_xla.runtime.process_index /
    process_count are faked (r, 2), so init_runtime('xla') builds the multi-host Runtime, and the
    cross-host reduction under all_gather_object / agree / barrier (Runtime._sum_over_hosts) is a
    gloo all-reduce between the two processes. The rest is real: train.build_stage's loader for
    rank r of 2 over the demo shards reads 3 batches, train.save_checkpoint writes the checkpoint
    from the master, each host resumes with train.build_stage from train_state.pt. The saved lists
    hold one loader state and one RNG state per host; each host's next 2 batches equal its
    uninterrupted loader's and its RNG state is its own. From host 0's entries alone (what was
    saved before) host 1 would read other batches and take host 0's RNG."""
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [PY, str(script), str(r), port, demo_small.train_wds, str(out)],
            cwd=REPO,
            env=env(CPU_NUM_DEVICES=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    hosts = [torch.load(out / f"host{r}.pt", weights_only=True) for r in (0, 1)]

    saved = hosts[0]["saved"]
    assert _bits(saved, hosts[1]["saved"])  # both read the one train_state.pt
    assert saved["world_size"] == 2 and len(saved["rng"]) == len(saved["data"]) == 2
    assert [d["rank"] for d in saved["data"]] == [0, 1] and [d["batches"] for d in saved["data"]] == [3, 3]
    assert saved["data"][0]["workers"] != saved["data"][1]["workers"]  # different shards, positions
    assert not torch.equal(hosts[0]["mine"]["torch"], hosts[1]["mine"]["torch"])
    for r, h in enumerate(hosts):
        assert _bits(saved["rng"][r], h["mine"]), r
        assert _bits(h["resumed"]["batches"], h["want"]), f"host {r} did not resume at its position"
        assert _bits(h["resumed"]["rng"], h["mine"]), f"host {r} did not get its own RNG state back"
    assert not _bits(hosts[0]["want"], hosts[1]["want"])
    # host 0's entries only: right for host 0, wrong for host 1
    assert _bits(hosts[0]["host0_only"]["batches"], hosts[0]["want"])
    assert not _bits(hosts[1]["host0_only"]["batches"], hosts[1]["want"])
    assert _bits(hosts[1]["host0_only"]["rng"], hosts[0]["mine"])
