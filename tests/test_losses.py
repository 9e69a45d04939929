"""losses.py: the softmax and sigmoid (SigLIP) contrastive losses against OpenCLIP's ClipLoss and
SigLipLoss, in one process and in two gloo processes (every rank scoring its own rows)."""

import json
import math

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from runs import PY, free_port, run, tiny_demo_args, train
from safetensors import safe_open

import export
import factory
import losses
import xla_utils


def _features(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt, torch.tensor(math.log(10)).exp(), torch.tensor(-10.0)


def _loss_and_grads(fn, img, txt, scale, bias):
    leaves = [t.clone().requires_grad_() for t in (img, txt, scale, bias)]
    loss = fn(*leaves)
    loss.backward()
    return loss.item(), [t.grad for t in leaves]


@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_sigmoid_loss_equals_open_clip_in_one_process(impl):
    rt = xla_utils.init_runtime("cpu")
    fn = losses.sigmoid_loss_ring if impl == "ring" else losses.sigmoid_loss_gather
    img, txt, scale, bias = _features()
    ours, g_ours = _loss_and_grads(lambda i, t, s, b: fn(i, t, s, rt, b), img, txt, scale, bias)
    ref, g_ref = _loss_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s, b), img, txt, scale, bias)
    assert ours == pytest.approx(ref, abs=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6)
    img, txt, scale, bias = _features(seed=1)
    softmax = losses.ContrastiveLoss("softmax", rt)(losses.Features(img, txt, scale, bias))
    assert softmax.item() == pytest.approx(ClipLoss()(img, txt, scale).item(), abs=1e-6)
    sigmoid = losses.ContrastiveLoss("sigmoid", rt)(losses.Features(img, txt, scale, bias))
    assert sigmoid.item() == pytest.approx(SigLipLoss()(img, txt, scale, bias).item(), abs=1e-6)


RING_SCRIPT = r"""
import json, sys, torch
from open_clip.loss import SigLipLoss
import losses, xla_utils
from test_losses import _features, _loss_and_grads
rt = xla_utils.init_runtime("cpu")
W, r = rt.world_size, rt.rank
img, txt, scale, bias = _features(n=8 * W, seed=3)                  # the global batch
mine = slice(r * 8, (r + 1) * 8)
out = {}
saved = {}
for name, fn in [("gather", losses.sigmoid_loss_gather), ("ring", losses.sigmoid_loss_ring),
                 ("open_clip", lambda i, t, s, rt, b: SigLipLoss(rank=r, world_size=W)(i, t, s, b))]:
    total = [0]
    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = _loss_and_grads(lambda i, t, s, b: fn(i, t, s, rt, b), img[mine], txt[mine], scale, bias)
    saved[name] = total[0]
    mean = torch.tensor([loss / W]); rt.all_reduce_mean(mean); mean = mean.item() * W / W
    out[name] = {"loss": loss, "mean_loss": mean, "grads": [g.tolist() for g in grads]}
out["saved_bytes"] = saved
open(sys.argv[-1] + f".{r}", "w").write(json.dumps(out))
rt.barrier(); rt.shutdown()
"""


@pytest.mark.slow
def test_sigmoid_loss_on_two_processes_equals_one_and_open_clip(tmp_path):
    """2 gloo processes, 8 rows each: gather and ring give each rank OpenCLIP's SigLipLoss and
    gradients, their mean over ranks is the one-process loss of the 16 rows (gradients too, the
    text features' gradients being those of every rank's loss); the ring keeps no more for the
    backward than one process does (the gather keeps every rank's texts and logits)."""
    script = tmp_path / "ring.py"
    script.write_text(RING_SCRIPT)
    port = str(free_port())
    p = run([PY, "xla_utils.py", "launch", "--nproc", "2", "--master-port", port, str(script), str(tmp_path / "r")])
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"r.{k}").read_text()) for k in (0, 1)]
    rt = xla_utils.init_runtime("cpu")
    img, txt, scale, bias = _features(n=16, seed=3)
    one, g_one = _loss_and_grads(lambda i, t, s, b: losses.sigmoid_loss_gather(i, t, s, rt, b), img, txt, scale, bias)
    for k, res in enumerate(ranks):
        for impl in ("gather", "ring"):
            assert res[impl]["loss"] == pytest.approx(res["open_clip"]["loss"], abs=1e-5), (k, impl)
            for a, b in zip(res[impl]["grads"][:2], res["open_clip"]["grads"][:2]):
                assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), (k, impl)
    for impl in ("gather", "ring"):
        assert (ranks[0][impl]["loss"] + ranks[1][impl]["loss"]) / 2 == pytest.approx(one, abs=1e-5)
        # image rows: each rank's own loss; text rows: every rank's loss (x 1/2 for the mean)
        g_img = torch.cat([torch.tensor(r[impl]["grads"][0]) for r in ranks]) / 2
        g_txt = torch.cat([torch.tensor(r[impl]["grads"][1]) for r in ranks]) / 2
        assert torch.allclose(g_img, g_one[0], atol=1e-5) and torch.allclose(g_txt, g_one[1], atol=1e-5)
    saved = ranks[0]["saved_bytes"]
    assert saved["ring"] < saved["gather"]
    one_proc = {}
    img8, txt8, _, _ = _features(n=8, seed=3)
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss_and_grads(lambda i, t, s, b: losses.sigmoid_loss_ring(i, t, s, rt, b), img8, txt8, scale, bias)
    one_proc["ring"] = total[0]
    assert saved["ring"] == one_proc["ring"]  # no growth with the world size


@pytest.mark.slow
def test_a_sigmoid_stage_trains_saves_and_exports_its_bias(demo_small, tmp_path):
    """--set STAGE.loss=sigmoid: SigLIP's initialisation (t' = log 10, b = -10), the bias trained,
    stored in the checkpoint and exported as OpenCLIP's logit_bias."""
    out = tmp_path / "run"
    train(
        tiny_demo_args(
            demo_small,
            out,
            "--stage",
            "pretrain",
            "--set",
            "pretrain.loss=sigmoid",
            "--set",
            "pretrain.train_num_samples=64",
        )
    )
    ckpt = out / "checkpoints" / "step_00000004"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        bias, scale = f.get_tensor("logit_bias").item(), f.get_tensor("logit_scale").item()
    assert bias != -10.0 and abs(bias + 10) < 0.1 and abs(scale - math.log(10)) < 0.1
    net = factory.create_model(None, pretrained=str(ckpt))
    assert net.cfg.loss == "sigmoid" and net.logit_bias.item() == bias
    export.export_open_clip(net, str(tmp_path / "oc") + "/")
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
    assert oc.logit_bias.item() == pytest.approx(bias)
