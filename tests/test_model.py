"""model.py on its own: the registry, shapes, token masking, FLOPs, parameter counts and its CLI.

Tiny configs only (CPU, seconds). Loading weights is in test_factory.py; parity with OpenCLIP in
test_interop.py."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(
    pool="gap_cls",
    image_size=64,
    patch=8,
    width=32,
    mask="none",
    ratio=0.0,
    pos="learnable",
    ctx=16,
    pre_norm=True,
    gelu="exact",
):
    base = M.get_model_config("ViT-Test-8-CL16")
    return replace(
        base,
        gelu=gelu,
        vision=replace(
            base.vision,
            pool=pool,
            image_size=image_size,
            patch_size=patch,
            width=width,
            mask=mask,
            mask_ratio=ratio,
            pos_embed=pos,
            pre_norm=pre_norm,
        ),
        text=replace(base.text, context_length=ctx),
    )


def tokens(n, ctx, vocab=49408):
    t = torch.randint(1, vocab - 1, (n, ctx))
    t[torch.arange(n), torch.randint(1, ctx, (n,))] = vocab - 1  # one EOT (largest id) per row
    return t


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_aliases_resolve():
    for name in M.list_models():
        assert M.get_model_config(name).vision.grid > 0
    # the reference scripts' misspellings and OpenCLIP's names resolve to our configs
    assert M.get_model_config("ViT-H-14-CL8-SyntaxMask-GAP") == M.get_model_config("ViT-H-14-CL8-Syntax-GAP")
    assert M.get_model_config("ViT-H-14-CLIPA-336").vision.image_size == 336
    cfg = M.get_model_config("ViT-B-16-CL16", image_size=112, context_length=8, mask="random", mask_ratio=0.5)
    assert (cfg.vision.image_size, cfg.text.context_length, cfg.vision.mask) == (112, 8, "random")


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"did you mean: .*ViT-H-14-CL32-GAP") as e:
        M.get_model_config("ViT-H-14-CL32-GAPP")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", ["ViT-Test-8-CL16", "ViT-Test-8-CL32-GAP-BigVision"])
def test_forward_shapes_and_logit_scale(name):
    m = M.CLIP(M.get_model_config(name)).eval()
    cfg = m.cfg
    img = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    txt = tokens(3, cfg.text.context_length, cfg.text.vocab_size)
    fi, ft, scale = m(img, txt)
    assert fi.shape == ft.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(fi.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    assert m.encode_image(img).shape == (3, cfg.embed_dim)
    with pytest.raises(ValueError, match="do not fit"):
        m.encode_image(torch.randn(1, 3, 2 * cfg.vision.image_size, 2 * cfg.vision.image_size))


def test_text_pooling_rules():
    """v1 pools at the EOT (largest id) position with a causal mask: tokens after EOT cannot change the
    feature. v2 pools the last position, bidirectionally: every token matters."""
    torch.manual_seed(0)
    v1 = M.CLIP(tiny()).eval()
    t = tokens(2, 16)
    t[:, 5] = 49407
    t[:, 6:] = torch.randint(1, 49000, (2, 10))
    t2 = t.clone()
    t2[:, 7:] = torch.randint(1, 49000, (2, 9))
    torch.testing.assert_close(v1.encode_text(t), v1.encode_text(t2))
    v2 = M.CLIP(M.get_model_config("ViT-Test-8-CL32-GAP-BigVision")).eval()
    a = torch.randint(0, 32000, (2, 32))
    b = a.clone()
    b[:, 0] = (b[:, 0] + 1) % 32000
    assert not torch.allclose(v2.encode_text(a), v2.encode_text(b))


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = M.CLIP(tiny()).train()
    img, txt = torch.randn(2, 3, 64, 64), tokens(2, 16)

    def grads():
        m.zero_grad()
        fi, ft, s = m(img, txt)
        (s * fi @ ft.T).logsumexp(1).sum().backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    plain = grads()
    m.set_grad_checkpointing(True)
    ckpt = grads()
    assert len(plain) == len(ckpt) > 10
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("strategy", ["random", "grid", "block"])
@pytest.mark.parametrize("grid,ratio", [(7, 0.25), (8, 0.5), (14, 0.75), (6, 0.4), (16, 0.3)])
def test_mask_keeps_exact_count(strategy, grid, ratio):
    keep = M.mask_indices(5, grid, strategy, ratio, "cpu")
    k = M.keep_count(grid * grid, ratio)
    assert k == int(grid * grid * (1 - ratio))
    assert keep.shape == (5, k)
    assert all(len(set(row.tolist())) == k for row in keep)  # no duplicates
    assert keep.min() >= 0 and keep.max() < grid * grid


def test_grid_mask_is_a_regular_subgrid():
    keep = M.mask_indices(8, 14, "grid", 0.75, "cpu")
    for row in keep:
        r, c = row // 14, row % 14
        # one patch of every 2x2 cell: all kept patches share one (row, col) parity
        assert len(set((r % 2).tolist())) == 1 and len(set((c % 2).tolist())) == 1
    half = M.mask_indices(1, 8, "grid", 0.5, "cpu")[0]
    assert len(set(((half // 8 + half % 8) % 2).tolist())) == 1  # checkerboard


def test_block_mask_drops_contiguous_regions():
    """Dropped patches of block masking cluster: far more dropped-dropped neighbour pairs than random."""

    def adjacent_pairs(strategy):
        torch.manual_seed(0)
        keep = M.mask_indices(64, 14, strategy, 0.5, "cpu")
        dropped = torch.ones(64, 196, dtype=torch.bool)
        dropped[torch.arange(64)[:, None], keep] = False
        d = dropped.reshape(64, 14, 14)
        return ((d[:, 1:] & d[:, :-1]).sum() + (d[:, :, 1:] & d[:, :, :-1]).sum()).item()

    assert adjacent_pairs("block") > 1.4 * adjacent_pairs("random")


def _transformer_input(model, images, **kw):
    """The token sequence entering the vision blocks (captured by a hook)."""
    seen = {}
    h = model.visual.transformer.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    try:
        out = model.encode_image(images, **kw)
    finally:
        h.remove()
    return seen["x"], out


@pytest.mark.parametrize("strategy", ["random", "grid", "block"])
def test_masking_keeps_cls_and_output_shape(strategy):
    torch.manual_seed(0)
    cfg = tiny(mask=strategy, ratio=0.5, pre_norm=False)  # no pre-norm: block input = embeddings
    m = M.CLIP(cfg).train()
    img = torch.randn(4, 3, 64, 64)
    x, out = _transformer_input(m, img)
    assert x.shape == (4, 1 + 32, 32) and out.shape == (4, cfg.embed_dim)
    vis = m.visual
    torch.testing.assert_close(x[:, 0], (vis.class_embedding + vis.positional_embedding[0]).expand(4, -1))
    full = vis.conv1(img).flatten(2).transpose(1, 2) + vis.positional_embedding[1:]  # all 64 patches
    for b in range(4):
        # every kept token is one of this image's patch tokens (position embedding added before masking)
        d = (x[b, 1:, None] - full[b, None]).abs().amax(dim=-1)  # [kept, 64]
        assert (d.min(dim=1).values < 1e-6).all()


def test_random_mask_differs_across_samples_and_eval_is_unmasked():
    torch.manual_seed(0)
    m = M.CLIP(tiny(mask="random", ratio=0.75, pre_norm=False)).train()
    img = torch.randn(1, 3, 64, 64).expand(4, -1, -1, -1)  # the same image four times
    x, out = _transformer_input(m, img)
    assert x.shape[1] == 1 + 16
    assert len({tuple(torch.round(t[1:].sum(-1), decimals=4).tolist()) for t in x}) == 4
    assert not torch.allclose(out[0], out[1])
    m.eval()
    x, out = _transformer_input(m, img)
    assert x.shape[1] == 1 + 64
    torch.testing.assert_close(out[0], out[3])
    m.train()
    torch.testing.assert_close(m.encode_image(img, mask=False), out)  # train mode, masking off
    m.eval()
    assert _transformer_input(m, img, mask=True)[0].shape[1] == 17  # eval mode, asked for


def test_masking_on_xla_compiles_once():
    """Static keep count + on-device random numbers: masked steps on an XLA device reuse one graph."""
    import torch_xla
    import torch_xla.debug.metrics as met

    dev = torch_xla.device()
    m = M.CLIP(tiny(mask="random", ratio=0.5)).train().to(dev)
    img = torch.randn(2, 3, 64, 64).to(dev)
    outs = []
    for step in range(3):
        outs.append(m.encode_image(img).cpu())
        torch_xla.sync()  # end of step, as in training (flushes the RNG seed)
        if step == 0:
            compiles = met.metric_data("CompileTime")[0]
    assert met.metric_data("CompileTime")[0] == compiles
    assert not torch.allclose(outs[1], outs[2])  # fresh random draws


# ----------------------------------------------------------------------------- FLOPs


def test_flops_reproduce_the_v2_paper():
    h14 = M.get_model_config("ViT-H-14-CL32-GAP-BigVision")
    assert M.count_flops(h14, 224, 32)["total_gflops"] == pytest.approx(177.0, rel=0.01)
    assert M.count_flops(h14, 336, 32, mask_ratio=0.4)["total_gflops"] == pytest.approx(237.8, rel=0.01)
    # the paper's 135.9 G (224 px, 30% mask) is not what 179 kept patches cost (see README)
    r = M.count_flops(h14, 224, 32, mask_ratio=0.3)
    assert r["patches_kept"] == 179 and r["total_gflops"] == pytest.approx(125.8, abs=0.05)


@pytest.mark.parametrize("ratio,pool", [(0.0, "gap_cls"), (0.5, "gap_cls"), (0.5, "cls")])
def test_flops_match_torch_flop_counter(ratio, pool):
    """Our formula (1 MAC = 1 FLOP) against torch's FlopCounterMode (which counts 2 per MAC): the
    papers' count where every row is computed (GAP), and the executed count where a tower reads one
    row (CLS, EOT): its last block runs k, v over all tokens and the rest over that row alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(mask="random", ratio=ratio, width=64, pool=pool)
    m = M.CLIP(cfg).train()
    measured = {}
    # the math backend spells attention as bmm's, which the counter sees (fused CPU kernels it does not)
    for tower, run in (
        ("image", lambda: m.encode_image(torch.randn(1, 3, 64, 64))),
        ("text", lambda: m.encode_text(tokens(1, 16))),
    ):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            run()
        measured[tower] = fc.get_total_flops() / 2 / 1e9
    ours = M.count_flops(cfg, mask_ratio=ratio)
    assert measured["image"] + measured["text"] == pytest.approx(ours["executed_gflops"], rel=1e-9)
    assert measured["text"] < 0.9 * ours["text_gflops"]  # T16, 2 blocks: the last one mostly saved
    if pool == "gap_cls":
        assert measured["image"] == pytest.approx(ours["image_gflops"], rel=1e-9)
    else:
        assert measured["image"] < 0.9 * ours["image_gflops"]


def test_a_picked_last_block_gives_the_full_blocks_row_and_gradients():
    """CLS / EOT pooling computes the last block for the read-out row only; features and every
    gradient equal those of the same model computing all rows (each EOT position, causal text)."""
    torch.manual_seed(0)
    m = M.CLIP(tiny(pool="cls", width=64)).train().double()  # float64: sums in another order agree
    img, txt = torch.randn(4, 3, 64, 64, dtype=torch.float64), tokens(4, 16)
    txt[0, -1], txt[1, 0] = 49407, 49407  # EOT at the last and the first position

    def run(full: bool):
        for tower in (m.visual, m.text):
            last = tower.transformer.resblocks[-1]
            last.forward = (
                (lambda x, causal=False, pick=None, b=last: M._rows(M.Block.forward(b, x, causal), pick))
                if full
                else M.Block.forward.__get__(last)
            )
        m.zero_grad()
        fi, ft, s = m(img, txt)
        (s * fi @ ft.T).logsumexp(1).sum().backward()
        return [fi, ft] + [p.grad.clone() for p in m.parameters()]

    full, picked = run(full=True), run(full=False)
    assert len(full) == len(picked) == len(list(m.parameters())) + 2
    for a, b in zip(full, picked):
        torch.testing.assert_close(a, b)


def _cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "model.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def _main(capsys, *args):
    try:
        rc = M.main(list(args))
    except SystemExit as e:  # argparse errors exit from inside
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_flops_cli_json_and_errors(capsys):
    r = _cli("flops", "ViT-H-14-CL32-GAP-BigVision", "--image-size", "336", "--mask-ratio", "0.4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) == {"image_gflops", "text_gflops", "total_gflops", "executed_gflops"}
    assert d["total_gflops"] == pytest.approx(237.8, rel=0.01)
    assert d["total_gflops"] - 1.5 < d["executed_gflops"] < d["total_gflops"]  # GAP image; EOT: text's last block
    rc, out, _ = _main(capsys, "flops", "ViT-H-14-CLIPA")
    assert rc == 0 and "total 177.01 GFLOPs" in out
    for bad in (
        ["flops", "ViT-H-14-CL32"],
        ["flops", "ViT-B-16-CL16", "--mask-ratio", "1.5"],
        ["flops", "ViT-B-16-CL16", "--image-size", "x"],
        ["flops"],
    ):
        rc, out, err = _main(capsys, *bad)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and not out, err


def test_list_cli_names_models_and_aliases(capsys):
    rc, out, err = _main(capsys, "list")
    lines = out.splitlines()
    assert rc == 0 and not err
    assert lines[: len(M.MODEL_CONFIGS)] == sorted(M.MODEL_CONFIGS)
    assert "ViT-H-14-CLIPA -> ViT-H-14-CL32-GAP-BigVision" in lines[len(M.MODEL_CONFIGS) :]
    assert len(lines) == len(M.MODEL_CONFIGS) + len(M.MODEL_ALIASES)


# ----------------------------------------------------------------------------- parameters, wrappers


def test_parameter_count_is_known_before_building():
    """The count from the config equals the built model's: its state dict (the sin-cos table
    included), its trainable parameters (without it) and each of its blocks."""
    for name in M.MODEL_CONFIGS:
        for pos in M.POS_EMBEDS:
            c = M.get_model_config(name, pos_embed=pos)
            with torch.device("meta"):
                m = M.CLIP(c)
            built = sum(t.numel() for t in m.state_dict().values())
            assert M.count_parameters(c) == built, (name, pos)
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            assert M.count_parameters(c, trainable=True) == trainable, (name, pos)
            for tower, tc in ((m.visual, c.vision), (m.text, c.text)):
                block = sum(p.numel() for p in tower.transformer.resblocks[0].parameters())
                assert M.block_parameters(tc.width, int(tc.width * tc.mlp_ratio)) == block, name
    assert 4 * M.count_parameters(M.get_model_config("ViT-bigG-14-CL32-GAP-BigVision")) == M.MAX_PARAMETERS
    sigmoid = replace(M.get_model_config("ViT-Test-8-CL16"), loss="sigmoid")  # a logit bias too
    assert M.count_parameters(sigmoid) == sum(p.numel() for p in M.CLIP(sigmoid).parameters())


def test_unwrap_finds_the_clip_inside_a_wrapper():
    m = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    wrapper = torch.nn.Module()
    wrapper.module = m  # where DistributedDataParallel keeps the model
    assert M.unwrap(wrapper) is m
    assert M.unwrap(m) is m
