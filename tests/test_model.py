"""model.py on its own: shapes, token masking, position tables, FLOPs, checkpoints and errors.

Tiny configs only (CPU, seconds). Parity with OpenCLIP lives in test_interop.py."""

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

import export
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
        M.create_model("ViT-H-14-CL32-GAPP")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(image_size=100), "multiple of the patch"),
        (dict(mask="spiral", mask_ratio=0.5), "unknown image mask"),
        (dict(mask="random", mask_ratio=1.0), "mask ratio"),
    ],
)
def test_bad_overrides_are_one_line_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        M.create_model("ViT-Test-8-CL16", **kw)


def test_get_tokenizer_follows_the_model():
    """Defaults: the model's context length and training reduction; both can be overridden."""
    tok = M.get_tokenizer("ViT-L-16-CL8-Syntax-GAP")
    assert (tok.tokenizer, tok.context_length, tok.reduction) == ("clip_bpe", 8, "syntax")
    tok = M.get_tokenizer("ViT-L-14-CLIPA", context_length=16, reduction="truncate")
    assert (tok.tokenizer, tok.context_length, tok.reduction) == ("wordpiece", 16, "truncate")
    assert tok(["a photo of a dog"]).shape == (1, 16)
    cfg = M.get_model_config("ViT-Tiny-8-CL16-Syntax-GAP", context_length=12)  # a config: its own text
    assert repr(M.get_tokenizer(cfg)) == "Tokenizer('clip_bpe', context_length=12, reduction='syntax')"
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        M.get_tokenizer("ViT-Q-99")
    with pytest.raises(ValueError, match="context_length must be an int >= 2, got 0"):
        M.get_tokenizer("ViT-B-16-CL16", context_length=0)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", ["ViT-Test-8-CL16", "ViT-Test-8-CL32-GAP-BigVision"])
def test_forward_shapes_and_logit_scale(name):
    m = M.create_model(name).eval()
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
    v2 = M.create_model("ViT-Test-8-CL32-GAP-BigVision").eval()
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


# ----------------------------------------------------------------------------- position tables


def test_sincos_table_is_a_buffer_recomputed_for_any_grid(tmp_path):
    m64 = M.CLIP(tiny(pos="sincos"))
    assert "visual.positional_embedding" in dict(m64.named_buffers())
    assert "visual.positional_embedding" not in dict(m64.named_parameters())
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(m64.state_dict(), str(path))
    m96 = M.create_model(tiny(pos="sincos"), image_size=96, pretrained=path)
    torch.testing.assert_close(m96.visual.positional_embedding, M.sincos_2d(32, 12), rtol=0, atol=0)
    # fine-tuning: a learnable table starts from the pre-train table resized to the new grid
    ml = M.create_model(tiny(pos="learnable"), image_size=96, pretrained=path)
    torch.testing.assert_close(ml.visual.positional_embedding, M.resize_image_pos_embed(M.sincos_2d(32, 8), 12))
    torch.testing.assert_close(ml.visual.conv1.weight, m64.visual.conv1.weight)


def test_text_table_resizes_linearly(tmp_path):
    m8 = M.CLIP(tiny(ctx=8))
    path = tmp_path / "w.pt"
    torch.save(m8.state_dict(), path)
    m32 = M.create_model(tiny(ctx=8), context_length=32, pretrained=path)
    got = m32.text.positional_embedding
    assert got.shape == (32, 32)
    # linear interpolation of 8 points to 32 (align_corners=False): position j samples (j + .5) / 4 - .5
    src = m8.text.positional_embedding.detach()
    j = 13
    s = (j + 0.5) / 4 - 0.5
    lo = int(s)
    torch.testing.assert_close(got[j], src[lo] * (1 - (s - lo)) + src[lo + 1] * (s - lo))


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


def test_tokenize_cli(capsys):
    rc, out, _ = _main(
        capsys, "tokenize", "--model", "ViT-B-16-CL16", "--context-length", "6", "a photo of a dog", "a cat"
    )
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "Tokenizer('clip_bpe', context_length=6, reduction='truncate')"
    assert lines[1] == "[49406, 320, 1125, 539, 320, 49407] 'a photo of a'"
    assert len(lines) == 3 and lines[2].startswith("[49406, 320, 2368, 49407, 0, 0] ")
    for bad, msg in (
        (["tokenize", "--model", "ViT-Q-99", "x"], "unknown model"),
        (["tokenize", "--reduction", "nope", "x"], "invalid choice"),
        (["tokenize"], "required: texts"),
    ):
        rc, out, err = _main(capsys, *bad)
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1 and not out, err


# ----------------------------------------------------------------------------- checkpoints


def test_our_checkpoint_records_its_config(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = M.get_model_config("ViT-Test-8-CL32-GAP-BigVision", image_size=48)
    m = M.CLIP(cfg).eval()
    ckpt = tmp_path / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    save_file(m.state_dict(), str(ckpt / "model.safetensors"), metadata=M.weights_metadata("x", cfg))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010\n")
    for path in (ckpt, ckpt / "model.safetensors", tmp_path):  # dir, file, run dir
        assert M.config_from_metadata(M.read_metadata(path)) == cfg
        m2 = M.create_model(None, pretrained=path).eval()
        img = torch.randn(2, 3, 48, 48)
        torch.testing.assert_close(m2.encode_image(img), m.encode_image(img), rtol=0, atol=0)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        M.create_model("ViT-Test-8-CL16", pretrained=tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.create_model("ViT-Test-8-CL16", pretrained=tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not weights\n")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cls": subprocess.Popen}, evil)  # arbitrary object
    for path, msg in ((text, "not a torch checkpoint"), (fake, "not a readable safetensors"), (evil, "weights_only")):
        with pytest.raises(ValueError, match=msg) as e:
            M.create_model("ViT-Test-8-CL16", pretrained=path)
        assert "\n" not in str(e.value)
    # wrong architecture: v2 weights into a v1 model
    v2 = tmp_path / "v2.pt"
    torch.save(M.create_model("ViT-Test-8-CL32-GAP-BigVision").state_dict(), v2)
    with pytest.raises(ValueError, match=r"missing visual\.ln_pre\.weight.*shape mismatch text\.token_embedding") as e:
        M.create_model("ViT-Test-8-CL16", pretrained=v2)
    assert "\n" not in str(e.value)


def _save_ours(path, name="ViT-Test-8-CL16", **over):
    from safetensors.torch import save_file

    cfg = M.get_model_config(name, **over)
    m = M.CLIP(cfg)
    save_file(m.state_dict(), str(path), metadata=M.weights_metadata(name, cfg))
    return m


def test_metadata_is_read_from_the_header_alone(tmp_path):
    """Defect 6: metadata came from reading the whole checkpoint. A file whose tensor bytes are cut
    off still yields its metadata (only the header is read), while its weights are a clean error."""
    full = tmp_path / "full.safetensors"
    m = _save_ours(full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-1000])
    meta = M.read_metadata(cut)
    assert meta["model_name"] == "ViT-Test-8-CL16" and M.config_from_metadata(meta) == m.cfg
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        M.read_weights(cut)
    pt = tmp_path / "w.pt"
    torch.save(m.state_dict(), pt)
    assert M.read_metadata(pt) == {}  # torch files record none


def test_create_model_from_metadata_reads_the_weights_once(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    src = _save_ours(path, image_size=48)
    reads, load_file = [], M.load_file
    monkeypatch.setattr(M, "load_file", lambda f: reads.append(f) or load_file(f))
    m = M.create_model(None, pretrained=path)
    assert reads == [str(path)] and m.cfg == src.cfg
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_create_model_and_transforms_returns_eval_mode(tmp_path):
    """A fine-tune checkpoint (30% random image masking) comes back in eval mode, as OpenCLIP's does:
    no tokens dropped, the same features every call."""
    path = tmp_path / "ft.safetensors"
    _save_ours(path, mask="random", mask_ratio=0.3)
    model, _, _ = M.create_model_and_transforms(None, pretrained=path)
    assert model.cfg.vision.mask_ratio == 0.3 and not model.training
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(img), model.encode_image(img), rtol=0, atol=0)


def _export_main(capsys, *args):
    try:
        rc = export.main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    _save_ours(path)
    out = str(tmp_path / "x.pt")
    for args, msg in (
        ([path, "--to", "open_clip", tmp_path / "no" / "x.pt"], "output directory does not"),
        ([tmp_path / "nope.pt", "--to", "open_clip", out], "checkpoint not found"),
        ([path, "--to", "open_clip", out, "--model", "ViT-Q-99"], "unknown model"),
        ([path, "--to", "open_clip", out, "--results", tmp_path / "r.json"], "results file not found"),
        ([path, "--to", "tf", out], "invalid choice"),
    ):
        rc, stdout, err = _export_main(capsys, *map(str, args))
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
        assert not stdout
    assert not os.path.exists(out)
    # the old command says where the export went, in one line
    rc, stdout, err = _main(capsys, "export", str(path), "--to", "open_clip", out)
    assert rc == 2 and err == f"error: the export moved to export.py: python export.py {path} --to open_clip {out}\n"


# ----------------------------------------------------------------------------- hostile configs, NaN weights


def test_parameter_count_is_known_before_building():
    for name in M.MODEL_CONFIGS:
        for pos in M.POS_EMBEDS:
            c = M.get_model_config(name, pos_embed=pos)
            with torch.device("meta"):
                built = sum(t.numel() for t in M.CLIP(c).state_dict().values())
            assert M.count_parameters(c) == built, (name, pos)
    assert 4 * M.count_parameters(M.get_model_config("ViT-bigG-14-CL32-GAP-BigVision")) == M.MAX_PARAMETERS


def _crafted(path, vision=None, text=None, top=None):
    """Our weights file (ViT-Test-8-CL16 tensors) whose header config was edited by hand."""
    from safetensors.torch import save_file

    m = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    cfg = json.loads(M.weights_metadata("ViT-Test-8-CL16", m.cfg)["model_config"])
    cfg["vision"].update(vision or {})
    cfg["text"].update(text or {})
    cfg.update(top or {})
    save_file(
        m.state_dict(), str(path), metadata={"format": "clipa", "model_name": "x", "model_config": json.dumps(cfg)}
    )
    return path


@pytest.mark.parametrize(
    "vision,text,top,msg",
    [
        ({"layers": 100000}, {"vocab_size": 1e12}, None, "text.vocab_size = 1000000000000.0"),
        ({"layers": 100000}, None, None, "100000 image and 2 text layers (limit 192)"),
        (
            {"width": 4096, "heads": 32, "layers": 190},
            {"width": 4096, "heads": 32, "layers": 190},
            None,
            "over the limit",
        ),
        (None, {"vocab_size": 10**12}, None, "over the limit"),
        ({"image_size": 8 * 100000}, None, None, "image patches"),
        (None, {"context_length": 10**9}, None, "text tokens"),
        ({"heads": 0}, None, None, "vision.heads = 0"),
        ({"width": "32"}, None, None, "vision.width = '32'"),
        ({"mlp_ratio": 1e9}, None, None, "mlp_ratio"),
        (None, None, {"embed_dim": -1}, "embed_dim = -1"),
    ],
)
def test_a_crafted_header_config_is_refused_before_allocating(tmp_path, vision, text, top, msg, capsys):
    """Sizes a file may ask for are bounded (positive integers, patches, context,
    parameters <= 4x the largest registered model) before anything is built: one line, exit 2."""
    path = _crafted(tmp_path / "evil.safetensors", vision, text, top)
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        M.create_model(None, pretrained=path)
    assert "\n" not in str(e.value)
    rc, stdout, err = _export_main(capsys, str(path), "--to", "open_clip", str(tmp_path / "out") + "/")
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out")


def test_a_config_that_does_not_fit_the_tensors_allocates_nothing(tmp_path, monkeypatch):
    """Within the limits but not what the file holds (160 text layers of width 2048: 33 GB were
    it built): refused from the meta model's shapes, before any memory is allocated."""
    path = _crafted(tmp_path / "big.safetensors", None, {"layers": 160, "width": 2048, "heads": 16})
    assert M.count_parameters(M.config_from_metadata(M.read_metadata(path))) < M.MAX_PARAMETERS
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(ValueError, match="does not fit this v1 architecture: missing text.transformer.resblocks.2"):
        M.create_model(None, pretrained=path)


def test_nonfinite_weights_load_with_a_warning(tmp_path, capsys):
    """NaN/Inf weights load (a user may want to inspect them) with a warning naming
    them; the export says so in one line."""
    from safetensors.torch import save_file

    m = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    sd = m.state_dict()
    sd["visual.proj"][0, 0] = float("nan")
    sd["text.ln_final.weight"][3] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path), metadata=M.weights_metadata("ViT-Test-8-CL16", m.cfg))
    with pytest.warns(
        M.NonFiniteWeightsWarning, match="non-finite weights .* in 2 tensors: text.ln_final.weight, visual.proj"
    ):
        loaded = M.create_model(None, pretrained=path)
    assert sorted(loaded.nonfinite_weights) == ["text.ln_final.weight", "visual.proj"]
    rc, stdout, err = _export_main(capsys, str(path), "--to", "open_clip", str(tmp_path / "x.safetensors"))
    assert rc == 0 and err.count("\n") == 1 and err.startswith("warning: ") and "non-finite" in err, err
    good = tmp_path / "good.safetensors"
    _save_ours(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.create_model(None, pretrained=good).nonfinite_weights == []
