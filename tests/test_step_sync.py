"""The step never waits for the host: a non-finite loss drops its update on the device (weights, AdamW's
moments and step count untouched), the host reads the step's values only on logging steps and at
decision points (torch_xla's transfer counters on PJRT's CPU client), and the batch feed that moves
the next batch ahead still saves the loader state of the batch stepped on."""

import json
import math

import pytest
import torch
from runs import PY, free_port, run, same_weights, tiny_demo_args
from runs import losses as losses_of

import config
import factory
import losses
import train
import transforms
import xla_utils


class NanAt(losses.ContrastiveLoss):
    """The contrastive loss, NaN on the calls numbered in `bad` (1-based)."""

    def __init__(self, kind, rt, bad):
        super().__init__(kind, rt)
        self.bad, self.calls = bad, 0

    def __call__(self, f):
        self.calls += 1
        out = super().__call__(f)
        return out * float("nan") if self.calls in self.bad else out


STAGE = config.Stage("s", model="ViT-Test-8-CL16", image_size=32, batch_size=4, lr=1e-3, warmup=1,
                     weight_decay=0.2, train_num_samples=40)  # fmt: skip


def _batches(n=4):
    g = torch.Generator().manual_seed(5)
    shapes = ((4, 3, 32, 32), (4, 16))
    return [
        (
            torch.randint(0, 256, shapes[0], dtype=torch.uint8, generator=g),
            torch.randint(1, 4000, shapes[1], generator=g),
        )
        for _ in range(n)
    ]


def _steps(rt, bad, batches, at=None):
    """(weights, AdamW, Step) after one step on each of `batches` (at the schedule's steps `at`,
    default 0, 1, ...), the loss NaN at the calls numbered in `bad`."""
    torch.manual_seed(0)
    m = factory.create_model("ViT-Test-8-CL16").to(rt.device).train()
    opt = train.build_optimizer(m, STAGE, rt)
    step = train.Step(rt, m, opt, NanAt(m.cfg.loss, rt, bad))
    for i, (images, tokens) in zip(at or range(len(batches)), batches):
        step(images, tokens, train.lr_at(i, STAGE))
        rt.step_boundary()
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}, opt, step


@pytest.mark.slow
def test_a_nonfinite_step_is_dropped_on_the_device_as_if_it_had_not_run():
    """The 2nd of 4 steps has a NaN loss: the weights and AdamW's moments and step counts equal those
    of the 3 finite steps alone, bit for bit (weight decay did not move them either), and the tally
    the host reads at its next decision point names step 2, once."""
    rt = xla_utils.init_runtime("cpu")
    batches = _batches()
    w_drop, opt_drop, step = _steps(rt, {2}, batches)
    # the same finite batches without the dropped one, at the same points of the schedule
    w_ref, opt, _ = _steps(rt, set(), [batches[i] for i in (0, 2, 3)], at=(0, 2, 3))
    assert all(torch.equal(v, w_ref[k]) for k, v in w_drop.items())
    for p_drop, p in zip(opt_drop.param_groups[1]["params"], opt.param_groups[1]["params"]):
        a, b = opt_drop.state[p_drop], opt.state[p]
        assert float(a["step"]) == float(b["step"]) == 3.0
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert step.nonfinite() == (1, 2, 2)
    assert step.nonfinite() == (0, 2, 2)  # read once
    # all finite: the same weights as the plain optimizer step (bit for bit), nothing dropped
    w_all, _, clean = _steps(rt, set(), batches)
    torch.manual_seed(0)
    m2 = factory.create_model("ViT-Test-8-CL16").train()
    opt2 = train.build_optimizer(m2, STAGE, rt)
    for i, (images, tokens) in enumerate(batches):
        for group in opt2.param_groups:
            group["lr"] = train.lr_at(i, STAGE)
        image, text, scale = m2(transforms.normalize(images, m2.cfg.image_mean, m2.cfg.image_std), tokens)
        losses.ContrastiveLoss(m2.cfg.loss, rt)(losses.Features(image, text, scale, m2.logit_bias)).backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
        with torch.no_grad():
            m2.logit_scale.clamp_(0, math.log(100))
    assert all(torch.equal(w_all[k], v) for k, v in m2.state_dict().items())
    assert clean.nonfinite() == (0, 0, 0)


class FakeLoader:
    """A loader whose state is the number of batches it handed out."""

    def __init__(self):
        self.n = 0

    def __iter__(self):
        while True:
            self.n += 1
            yield torch.full((2, 3), self.n), torch.full((2,), self.n)

    def state_dict(self):
        return {"batches": self.n}


@pytest.mark.parametrize("ahead", [False, True])
def test_the_feed_saves_the_state_of_the_batch_stepped_on(ahead):
    """Moving a batch ahead pulls it from the loader early; the state a checkpoint takes is still that
    after the last batch handed out (the CPU passes batches through; the XLA feed moves one ahead,
    here with the host's own to_device)."""
    loader = FakeLoader()
    rt = xla_utils.CpuRuntime(torch.device("cpu"))
    if ahead:
        feed = xla_utils.XlaBatches(rt, iter(loader), loader)
    else:
        feed = rt.device_batches(iter(loader), loader)
    try:
        for i in range(1, 5):
            images, tokens = next(feed)
            assert images[0, 0].item() == tokens[0].item() == i
            feed.prefetch()
            assert loader.n == i + ahead  # one batch ahead, or none
            assert feed.state_dict() == {"batches": i}
    finally:
        feed.close()


XLA_SCRIPT = r"""
import json, sys
import torch_xla.debug.metrics as met
import train
seen = []
call = train.Step.__call__
def count(name):
    data = met.metric_data(name)
    return data[0] if data else 0
def counting(self, *a, **k):   # the counters as each step starts: what the previous step's work moved
    seen.append([count("TransferFromDeviceTime"), count("CompileTime")])
    return call(self, *a, **k)
train.Step.__call__ = counting
rc = train.main(sys.argv[2:])
json.dump({"rc": rc, "seen": seen}, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_xla_steps_that_neither_log_nor_decide_read_nothing_from_the_device(demo_small, tmp_path):
    """train.py --device xla on PJRT's CPU client, 16 steps, a progress line every 4 and a decision
    every 5: the steps in between move nothing from the device to the host (torch_xla's
    TransferFromDeviceTime count stays put), the logging and deciding ones do, and the step compiles
    once (its graph after the first step, where AdamW creates its state, never again)."""
    script = tmp_path / "count.py"
    script.write_text(XLA_SCRIPT)
    args = tiny_demo_args(demo_small, tmp_path / "run", "--stage", "pretrain", "--device", "xla")
    args += ["--set", "pretrain.train_num_samples=256", "--log-every", "4", "--decide-every", "5"]
    args += ["--save-every", "1000"]
    p = run([PY, str(script), str(tmp_path / "seen.json"), *args])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "seen.json").read_text())
    assert res["rc"] == 0 and len(res["seen"]) == 16
    transfers = [b[0] - a[0] for a, b in zip(res["seen"], res["seen"][1:])]  # of steps 1..15
    busy = {1, 4, 8, 12} | {5, 10, 15}  # logging (and the first) steps, decision points
    quiet = [s for s in range(2, 16) if s not in busy]
    assert [transfers[s - 1] for s in quiet] == [0] * len(quiet), transfers
    assert all(transfers[s - 1] > 0 for s in busy), transfers
    compiles = [c for _, c in res["seen"]]
    assert compiles[2:] == [compiles[2]] * 14, compiles


@pytest.mark.slow
def test_xla_resume_is_bit_exact_with_the_batch_moved_ahead(demo_small, tmp_path):
    """train.py --device xla moves each next batch to the device ahead of its step; a run stopped at
    step 5 (its feed already holding batch 6) and resumed repeats the uninterrupted run bit for bit:
    the checkpoint holds the loader state after batch 5, the one stepped on."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--stage", "pretrain", "--device", "xla"]
    train_py = [PY, "train.py"]
    for out, extra in ((full, []), (part, ["--max-steps", "5"]), (part, ["--resume", "latest"])):
        p = run([*train_py, *tiny_demo_args(demo_small, out, *args, *extra)])
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        if extra and extra[0] == "--max-steps":
            st = torch.load(part / "checkpoints" / "step_00000005" / "train_state.pt", weights_only=True)
            assert st["data"][0]["batches"] == 5
    want, _ = losses_of(full)
    got, _ = losses_of(part)
    assert sorted(want) == list(range(1, 9)) and got == want
    final = "checkpoints/step_00000008/model.safetensors"
    assert same_weights(full / final, part / final)


RANKS_SCRIPT = r"""
import sys, torch
import config, factory, losses, train, xla_utils
class NanOnRank1(losses.ContrastiveLoss):      # rank 1's 2nd loss is NaN, rank 0's never
    calls = 0
    def __call__(self, f):
        self.calls += 1
        out = super().__call__(f)
        return out * float("nan") if self.rt.rank == 1 and self.calls == 2 else out
rt = xla_utils.init_runtime("cpu")
torch.manual_seed(0)
m = factory.create_model("ViT-Test-8-CL16").train()
stage = config.Stage("s", model="ViT-Test-8-CL16", image_size=32, batch_size=8, lr=1e-3, warmup=1,
                     train_num_samples=80)
opt = train.build_optimizer(m, stage, rt)
step = train.Step(rt, rt.wrap_model(m), opt, NanOnRank1(m.cfg.loss, rt))
g = torch.Generator().manual_seed(rt.rank)
for i in range(3):
    step(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
         torch.randint(1, 4000, (4, 16), generator=g), train.lr_at(i, stage))
steps = sorted({float(s["step"]) for s in opt.state.values()})
torch.save({"weights": m.state_dict(), "tally": step.nonfinite(), "steps": steps}, f"{sys.argv[-1]}.{rt.rank}")
rt.shutdown()
"""


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_drops_the_update_on_every_rank(tmp_path):
    """2 gloo processes (DDP), rank 1's 2nd loss NaN, rank 0's finite: both drop that update (the flag
    is all-reduced on the device), so the replicas stay identical, AdamW counts 2 steps on each, and
    both tallies name step 2."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    out = tmp_path / "r"
    p = run([PY, "xla_utils.py", "launch", "--nproc", "2", "--master-port", str(free_port()), str(script), str(out)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r0, r1 = (torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1))
    assert r0["tally"] == r1["tally"] == (1, 2, 2)
    assert r0["steps"] == r1["steps"] == [2.0]
    assert all(torch.equal(v, r1["weights"][k]) for k, v in r0["weights"].items())
    assert all(torch.isfinite(v).all() for v in r0["weights"].values())


XLA_DROP_SCRIPT = r"""
import sys, torch
import test_step_sync as t, xla_utils
rt = xla_utils.init_runtime("xla")
batches = t._batches()
w_drop, opt_drop, step = t._steps(rt, {2}, batches)
w_ref, opt, _ = t._steps(rt, set(), [batches[i] for i in (0, 2, 3)], at=(0, 2, 3))
states = [{k: v.cpu() for k, v in o.state[p].items()} for o in (opt_drop, opt) for p in o.param_groups[1]["params"][:3]]
torch.save({"drop": w_drop, "ref": w_ref, "tally": step.nonfinite(), "states": states}, sys.argv[1])
"""


@pytest.mark.slow
def test_xla_drops_a_nonfinite_step_in_its_graph(tmp_path):
    """XLA (PJRT's CPU client) has no fused AdamW: the update is selected away inside the graph. The
    2nd of 4 steps NaN: the weights and AdamW state equal those of the 3 finite steps alone."""
    script = tmp_path / "xla_drop.py"
    script.write_text(XLA_DROP_SCRIPT)
    p = run([PY, str(script), str(tmp_path / "r.pt")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = torch.load(tmp_path / "r.pt", weights_only=True)
    assert r["tally"] == (1, 2, 2)
    assert all(torch.equal(v, r["ref"][k]) for k, v in r["drop"].items())
    for a, b in zip(r["states"][:3], r["states"][3:]):
        assert float(a["step"]) == float(b["step"]) == 3.0
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
