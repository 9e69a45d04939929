"""The step never waits for the host: a non-finite loss drops its update on the device (weights, AdamW's
moments and step count untouched), the host reads the step's values only on logging steps and at
decision points (torch_xla's transfer counters on PJRT's CPU client), and the batch feed that moves
the next batch ahead still saves the loader state of the batch stepped on."""

import json
import math

import pytest
import torch
from runs import PY, run, tiny_demo_args
from runs import losses as losses_of
from safetensors import safe_open

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


def _steps(rt, bad, batches, weight_decay=0.2):
    """Weights and AdamW state after stepping through `batches`, the loss NaN at the calls in `bad`."""
    torch.manual_seed(0)
    m = factory.create_model("ViT-Test-8-CL16").train()
    stage = config.Stage("s", model="ViT-Test-8-CL16", image_size=32, batch_size=4, lr=1e-3, warmup=1,
                         weight_decay=weight_decay, train_num_samples=40)  # fmt: skip
    opt = train.build_optimizer(m, stage, rt)
    step = train.Step(rt, m, opt, NanAt(m.cfg.loss, rt, bad))
    for i, (images, tokens) in enumerate(batches):
        step(images, tokens, train.lr_at(i, stage))
    state = {k: v for p, s in opt.state.items() for k, v in s.items()}
    return {k: v.clone() for k, v in m.state_dict().items()}, opt, step, state


def test_a_nonfinite_step_is_dropped_on_the_device_as_if_it_had_not_run():
    """The 2nd of 4 steps has a NaN loss: the weights and AdamW's moments and step counts equal those
    of the 3 finite steps alone, bit for bit (weight decay did not move them either), and the tally
    the host reads at its next decision point names step 2, once."""
    rt = xla_utils.init_runtime("cpu")
    g = torch.Generator().manual_seed(5)
    batches = [
        (
            torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(1, 4000, (4, 16), generator=g),
        )
        for _ in range(4)
    ]
    w_drop, opt_drop, step, _ = _steps(rt, {2}, batches)
    # the same finite batches without the dropped one; the schedule's lr of the dropped call is skipped too
    torch.manual_seed(0)
    m = factory.create_model("ViT-Test-8-CL16").train()
    stage = config.Stage("s", model="ViT-Test-8-CL16", image_size=32, batch_size=4, lr=1e-3, warmup=1,
                         weight_decay=0.2, train_num_samples=40)  # fmt: skip
    opt = train.build_optimizer(m, stage, rt)
    ref = train.Step(rt, m, opt, losses.ContrastiveLoss(m.cfg.loss, rt))
    for i in (0, 2, 3):
        ref(*batches[i], train.lr_at(i, stage))
    assert all(torch.equal(w_drop[k], v) for k, v in m.state_dict().items())
    for p_drop, p in zip(opt_drop.param_groups[1]["params"], opt.param_groups[1]["params"]):
        a, b = opt_drop.state[p_drop], opt.state[p]
        assert float(a["step"]) == float(b["step"]) == 3.0
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert step.nonfinite() == (1, 2, 2)
    assert step.nonfinite() == (0, 2, 2)  # read once
    # all finite: the same weights as the plain optimizer step (bit for bit), nothing dropped
    w_all, _, clean, _ = _steps(rt, set(), batches)
    torch.manual_seed(0)
    m2 = factory.create_model("ViT-Test-8-CL16").train()
    opt2 = train.build_optimizer(m2, stage, rt)
    for i, (images, tokens) in enumerate(batches):
        for group in opt2.param_groups:
            group["lr"] = train.lr_at(i, stage)
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
    with safe_open(str(full / final), "pt") as a, safe_open(str(part / final), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
