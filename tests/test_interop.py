"""Weights in and out, checked against OpenCLIP 3.3.0 (the reference we did not write).

OpenCLIP models are built from their own configs with fewer layers (and small images) for speed;
every comparison is float32 with max |difference| <= 1e-5 x the output norm."""
import json
from dataclasses import replace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP as OpenCLIP

import model as M

TANH = {"act_kwargs": {"approximate": "tanh"}}


def oc_config(name, vision=None, text=None):
    cfg = open_clip.get_model_config(name)
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    return cfg


def oc_build(cfg, seed=0):
    torch.manual_seed(seed)
    return OpenCLIP(**cfg).eval()


def shrink(name, layers, **vision):
    cfg = M.get_model_config(name)
    return replace(cfg, vision=replace(cfg.vision, layers=layers, **vision),
                   text=replace(cfg.text, layers=layers))


def assert_same(a, b):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5 * a.norm(dim=-1).max()


def v1_tokens(n, ctx):
    t = torch.randint(1, 49000, (n, ctx))
    t[torch.arange(n), torch.randint(1, ctx, (n,))] = 49407          # EOT, the largest id
    return t


@pytest.fixture(scope="module")
def b16_2l(tmp_path_factory):
    """OpenCLIP's ViT-B-16 config with 2 layers per tower, registered in OpenCLIP as 'ViT-B-16-2L'."""
    path = tmp_path_factory.mktemp("oc_cfg") / "ViT-B-16-2L.json"
    path.write_text(json.dumps(oc_config("ViT-B-16", {"layers": 2}, {"layers": 2})))
    open_clip.add_model_config(path)
    return "ViT-B-16-2L"


@pytest.fixture(scope="module")
def v1_openclip(tmp_path_factory):
    """OpenCLIP ViT-B-16 (2 layers per tower) with a 16-token text context, saved as users save it."""
    cfg = oc_config("ViT-B-16", {"layers": 2}, {"layers": 2, "context_length": 16})
    oc = oc_build(cfg)
    path = tmp_path_factory.mktemp("v1") / "openclip_b16.pt"
    torch.save(oc.state_dict(), path)
    return oc, cfg, path


def test_v1_openclip_weights_load_here(v1_openclip, monkeypatch):
    oc, _, path = v1_openclip
    monkeypatch.setitem(M.MODEL_CONFIGS, "ViT-B-16-CL16-2L", shrink("ViT-B-16-CL16", 2))
    model, _, preprocess = M.create_model_and_transforms("ViT-B-16-CL16-2L", pretrained=str(path))
    model.eval()
    img, txt = torch.randn(2, 3, 224, 224), v1_tokens(3, 16)
    with torch.no_grad():
        assert_same(oc.encode_image(img), model.encode_image(img))
        assert_same(oc.encode_text(txt), model.encode_text(txt))
    from PIL import Image
    x = preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # red pixels normalised with the v1 (OpenAI) mean/std
    torch.testing.assert_close(x[0, 100, 100], torch.tensor((1 - M.OPENAI_MEAN[0]) / M.OPENAI_STD[0]))


def test_v2_openclip_clipa_weights_load_here(tmp_path, monkeypatch):
    """OpenCLIP's ViT-L-14-CLIPA (with the tanh GELU the CLIPA-v2 weights were trained with), saved as
    an OpenCLIP training checkpoint ({"state_dict": ...} with DDP "module." prefixes)."""
    cfg = oc_config("ViT-L-14-CLIPA", {"layers": 1, "image_size": 56, **TANH}, {"layers": 1, **TANH})
    oc = oc_build(cfg)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in oc.state_dict().items()}}, path)
    monkeypatch.setitem(M.MODEL_CONFIGS, "ViT-L-14-CL32-GAP-BigVision-1L",
                        shrink("ViT-L-14-CL32-GAP-BigVision", 1))
    model, _, preprocess = M.create_model_and_transforms("ViT-L-14-CL32-GAP-BigVision-1L", pretrained=path,
                                                         force_image_size=56)
    model.eval()
    img, txt = torch.randn(2, 3, 56, 56), torch.randint(0, 32000, (3, 32))
    with torch.no_grad():
        assert_same(oc.encode_image(img), model.encode_image(img))
        assert_same(oc.encode_text(txt), model.encode_text(txt))
    assert M.detect_layout(M.read_weights(path)) == "openclip-v2"


def test_resizing_on_load_matches_openclip(v1_openclip, b16_2l):
    """Loading into another grid / context length resizes the tables exactly as OpenCLIP does."""
    _, _, path = v1_openclip
    oc = open_clip.create_model(b16_2l, pretrained=str(path), force_image_size=96, force_context_length=32)
    ours = M.create_model(shrink("ViT-B-16-CL16", 2), image_size=96, context_length=32, pretrained=path)
    ours.eval(), oc.eval()
    img, txt = torch.randn(2, 3, 96, 96), v1_tokens(2, 32)
    with torch.no_grad():
        assert_same(oc.encode_image(img), ours.encode_image(img))
        assert_same(oc.encode_text(txt), ours.encode_text(txt))


def test_round_trip_openclip_here_openclip(v1_openclip, tmp_path):
    oc, cfg, path = v1_openclip
    out = tmp_path / "back.pt"
    ours = M.create_model(shrink("ViT-B-16-CL16", 2), pretrained=path)
    from safetensors.torch import save_file
    ckpt = tmp_path / "ours.safetensors"
    save_file(ours.state_dict(), str(ckpt), metadata=M.weights_metadata("ViT-B-16-CL16-2L", ours.cfg))
    M.export_open_clip(M.create_model(None, pretrained=ckpt), out)
    back = oc_build(cfg, seed=1)
    back.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ref = oc.state_dict()
    assert set(ref) == set(back.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    img, txt = torch.randn(2, 3, 224, 224), v1_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(back.encode_image(img), oc.encode_image(img))
        assert torch.equal(back.encode_text(txt), oc.encode_text(txt))


def test_export_cli_file_and_local_dir(tmp_path, b16_2l, capsys):
    """`python model.py export` -> a file OpenCLIP loads by name (v1, short context) and a local-dir
    export that OpenCLIP rebuilds exactly (v2: tanh GELU, no pre-norm, patch GAP, last-token text)."""
    from safetensors.torch import save_file
    # v1: our weights (ctx 16) -> OpenCLIP config of the same shape + force_context_length=16
    torch.manual_seed(3)
    ours = M.CLIP(shrink("ViT-B-16-CL16", 2)).eval()
    ckpt = tmp_path / "v1.safetensors"
    save_file(ours.state_dict(), str(ckpt), metadata=M.weights_metadata("ViT-B-16-CL16-2L", ours.cfg))
    out = tmp_path / "v1_openclip.pt"
    assert M.main(["export", str(ckpt), "--to", "open_clip", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    oc = open_clip.create_model(b16_2l, pretrained=str(out), force_context_length=16).eval()
    img, txt = torch.randn(2, 3, 224, 224), v1_tokens(2, 16)
    with torch.no_grad():
        assert_same(ours.encode_image(img), oc.encode_image(img))
        assert_same(ours.encode_text(txt), oc.encode_text(txt))
    # the same as a directory: OpenCLIP (and CLIP_benchmark) then also tokenizes at our 16 tokens
    assert M.main(["export", str(ckpt), "--to", "open_clip", str(tmp_path / "v1_dir") + "/"]) == 0
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'v1_dir'}").eval()
    assert open_clip.get_tokenizer(f"local-dir:{tmp_path / 'v1_dir'}").context_length == 16
    with torch.no_grad():
        assert_same(ours.encode_image(img), oc.encode_image(img))
        assert_same(ours.encode_text(txt), oc.encode_text(txt))

    # v2: directory export for 'local-dir:'
    torch.manual_seed(4)
    ours = M.create_model("ViT-Test-8-CL32-GAP-BigVision").eval()
    assert ours.cfg.gelu == "tanh" and not ours.cfg.vision.pre_norm and not ours.cfg.text.causal
    ckpt = tmp_path / "v2.safetensors"
    save_file(ours.state_dict(), str(ckpt), metadata=M.weights_metadata("ViT-Test-8-CL32-GAP-BigVision",
                                                                          ours.cfg))
    outdir = tmp_path / "v2_export"
    assert M.main(["export", str(ckpt), "--to", "open_clip", str(outdir) + "/"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    oc = open_clip.create_model(f"local-dir:{outdir}").eval()
    img, txt = torch.randn(2, 3, 32, 32), torch.randint(0, 32000, (2, 32))
    with torch.no_grad():
        assert_same(ours.encode_image(img), oc.encode_image(img))
        assert_same(ours.encode_text(txt), oc.encode_text(txt))


def test_v1_gap_against_hand_reference(tmp_path):
    """v1 GAP = mean over ALL tokens (CLS included) -> ln_post -> proj. The tokens come from OpenCLIP's
    own tower (same weights); the pooling is written out by hand. OpenCLIP's 'avg' pool (patch tokens
    only) is a different function, which the last assertion shows."""
    torch.manual_seed(5)
    cfg = M.get_model_config("ViT-Tiny-8-CL16-Syntax-GAP")
    assert cfg.vision.pool == "gap_cls"
    ours = M.CLIP(cfg).eval()
    oc_cfg = M.openclip_model_cfg(cfg)
    oc = OpenCLIP(**oc_cfg).eval()
    oc.load_state_dict(M.to_openclip_keys(ours.state_dict()), strict=True)
    img = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        inter = oc.visual.forward_intermediates(img, indices=1, output_fmt="NLC", output_extra_tokens=True,
                                                intermediates_only=True)
        tokens = torch.cat([inter["image_intermediates_prefix"][-1], inter["image_intermediates"][-1]], 1)
        assert tokens.shape == (3, 1 + 64, 128)
        ln = oc.visual.ln_post
        by_hand = F.layer_norm(tokens.mean(dim=1), (128,), ln.weight, ln.bias, ln.eps) @ oc.visual.proj
        assert_same(by_hand, ours.encode_image(img))
        assert not torch.allclose(oc.encode_image(img), by_hand, atol=1e-3)


@pytest.mark.parametrize("name", ["ViT-B-16-CL16", "ViT-L-16-CL8-Syntax-GAP", "ViT-H-14-CL32-GAP",
                                  "ViT-L-14-CL32-GAP-BigVision", "ViT-H-14-CLIPA-336",
                                  "ViT-bigG-14-CL32-GAP-BigVision"])
def test_full_size_models_map_to_openclip_names(name):
    """The printed OpenCLIP name (+ overrides) builds a model whose state dict has exactly our exported
    keys and shapes. Built on the meta device: full size, no memory, no time."""
    cfg = M.get_model_config(name)
    oc_name, kwargs, _ = M.openclip_target(cfg)
    assert oc_name is not None
    oc_cfg = open_clip.get_model_config(oc_name)
    if "force_context_length" in kwargs:
        oc_cfg["text_cfg"]["context_length"] = kwargs["force_context_length"]
    if "force_image_size" in kwargs:
        oc_cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"]
    with torch.device("meta"):
        ours = {k: v.shape for k, v in M.to_openclip_keys(M.CLIP(cfg).state_dict()).items()}
        theirs = {k: v.shape for k, v in OpenCLIP(**oc_cfg).state_dict().items()}
    assert ours == theirs


def test_wrong_architecture_is_a_one_line_error(v1_openclip, capsys):
    _, _, path = v1_openclip
    with pytest.raises(ValueError, match=r"openclip-v1 layout.*missing visual\.transformer\.resblocks\.2") as e:
        M.create_model(shrink("ViT-B-16-CL16", 3), pretrained=path)            # 3 layers vs 2
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unexpected visual.ln_pre.weight") as e:
        M.create_model(shrink("ViT-L-14-CL32-GAP-BigVision", 2), pretrained=path)
    assert "shape mismatch" in str(e.value) and "\n" not in str(e.value)
    assert M.main(["export", str(path), "--to", "open_clip", "/tmp/x.pt"]) == 2        # no config recorded
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--model" in err and err.count("\n") == 1


@pytest.mark.parametrize("width,grid", [(32, 8), (768, 7), (1280, 6)])
def test_sincos_table_matches_openclip(width, grid):
    from open_clip.pos_embed import get_2d_sincos_pos_embed
    ref = torch.from_numpy(get_2d_sincos_pos_embed(width, grid, cls_token=True)).float()
    torch.testing.assert_close(M.sincos_2d(width, grid), ref, rtol=0, atol=1e-6)
