"""Weights in and out, checked against OpenCLIP 3.3.0 (the reference we did not write).

OpenCLIP models are built from their own configs with fewer layers (and small images) for speed;
every comparison is float32 with max |difference| <= 1e-5 x the output norm."""

import json
import os
from dataclasses import replace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP as OpenCLIP

import config
import export
import factory
import model as M

TANH = {"act_kwargs": {"approximate": "tanh"}}
WEIGHTS_FILE = "open_clip_model.safetensors"


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
    return replace(cfg, vision=replace(cfg.vision, layers=layers, **vision), text=replace(cfg.text, layers=layers))


def assert_same(a, b):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5 * a.norm(dim=-1).max()


def v1_tokens(n, ctx):
    t = torch.randint(1, 49000, (n, ctx))
    t[torch.arange(n), torch.randint(1, ctx, (n,))] = 49407  # EOT, the largest id
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
    model, _, preprocess = factory.create_model_and_transforms("ViT-B-16-CL16-2L", pretrained=str(path))
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
    monkeypatch.setitem(M.MODEL_CONFIGS, "ViT-L-14-CL32-GAP-BigVision-1L", shrink("ViT-L-14-CL32-GAP-BigVision", 1))
    model, _, preprocess = factory.create_model_and_transforms(
        "ViT-L-14-CL32-GAP-BigVision-1L", pretrained=path, force_image_size=56
    )
    model.eval()
    img, txt = torch.randn(2, 3, 56, 56), torch.randint(0, 32000, (3, 32))
    with torch.no_grad():
        assert_same(oc.encode_image(img), model.encode_image(img))
        assert_same(oc.encode_text(txt), model.encode_text(txt))
    assert factory.detect_layout(factory.read_weights(path)) == "openclip-v2"


def test_resizing_on_load_matches_openclip(v1_openclip, b16_2l):
    """Loading into another grid / context length resizes the tables exactly as OpenCLIP does."""
    _, _, path = v1_openclip
    oc = open_clip.create_model(b16_2l, pretrained=str(path), force_image_size=96, force_context_length=32)
    ours = factory.create_model(shrink("ViT-B-16-CL16", 2), image_size=96, context_length=32, pretrained=path)
    ours.eval(), oc.eval()
    img, txt = torch.randn(2, 3, 96, 96), v1_tokens(2, 32)
    with torch.no_grad():
        assert_same(oc.encode_image(img), ours.encode_image(img))
        assert_same(oc.encode_text(txt), ours.encode_text(txt))


def test_round_trip_openclip_here_openclip(v1_openclip, tmp_path):
    oc, cfg, path = v1_openclip
    out = tmp_path / "back.pt"
    ours = factory.create_model(shrink("ViT-B-16-CL16", 2), pretrained=path)
    from safetensors.torch import save_file

    ckpt = tmp_path / "ours.safetensors"
    save_file(ours.state_dict(), str(ckpt), metadata=factory.weights_metadata("ViT-B-16-CL16-2L", ours.cfg))
    export.export_open_clip(factory.create_model(None, pretrained=ckpt), out)
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
    """`python export.py` -> a file OpenCLIP loads by name (v1, short context) and a local-dir
    export that OpenCLIP rebuilds exactly (v2: tanh GELU, no pre-norm, patch GAP, last-token text)."""
    from safetensors.torch import save_file

    # v1: our weights (ctx 16) -> OpenCLIP config of the same shape + force_context_length=16
    torch.manual_seed(3)
    ours = M.CLIP(shrink("ViT-B-16-CL16", 2)).eval()
    ckpt = tmp_path / "v1.safetensors"
    save_file(ours.state_dict(), str(ckpt), metadata=factory.weights_metadata("ViT-B-16-CL16-2L", ours.cfg))
    out = tmp_path / "v1_openclip.pt"
    assert export.main([str(ckpt), "--to", "open_clip", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    oc = open_clip.create_model(b16_2l, pretrained=str(out), force_context_length=16).eval()
    img, txt = torch.randn(2, 3, 224, 224), v1_tokens(2, 16)
    with torch.no_grad():
        assert_same(ours.encode_image(img), oc.encode_image(img))
        assert_same(ours.encode_text(txt), oc.encode_text(txt))
    # the same as a directory: OpenCLIP (and CLIP_benchmark) then also tokenizes at our 16 tokens
    assert export.main([str(ckpt), "--to", "open_clip", str(tmp_path / "v1_dir") + "/"]) == 0
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'v1_dir'}").eval()
    assert open_clip.get_tokenizer(f"local-dir:{tmp_path / 'v1_dir'}").context_length == 16
    with torch.no_grad():
        assert_same(ours.encode_image(img), oc.encode_image(img))
        assert_same(ours.encode_text(txt), oc.encode_text(txt))

    # v2: directory export for 'local-dir:'
    torch.manual_seed(4)
    ours = factory.create_model("ViT-Test-8-CL32-GAP-BigVision").eval()
    assert ours.cfg.gelu == "tanh" and not ours.cfg.vision.pre_norm and not ours.cfg.text.causal
    ckpt = tmp_path / "v2.safetensors"
    save_file(
        ours.state_dict(), str(ckpt), metadata=factory.weights_metadata("ViT-Test-8-CL32-GAP-BigVision", ours.cfg)
    )
    outdir = tmp_path / "v2_export"
    assert export.main([str(ckpt), "--to", "open_clip", str(outdir) + "/"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    oc = open_clip.create_model(f"local-dir:{outdir}").eval()
    img, txt = torch.randn(2, 3, 32, 32), torch.randint(0, 32000, (2, 32))
    with torch.no_grad():
        assert_same(ours.encode_image(img), oc.encode_image(img))
        assert_same(ours.encode_text(txt), oc.encode_text(txt))


def test_v2_export_dir_has_the_tokenizer_open_clip_reads_offline(tmp_path, monkeypatch):
    """OpenCLIP loads a 'local-dir:' model's HF tokenizer from that directory; the export
    writes it (from the shipped bert-base-uncased vocabulary, no download) and its ids are ours for
    captions that fit (a cut caption: OpenCLIP keeps [CLS] + 30 pieces + 0, we [CLS] + 31 pieces)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(6)
    ours = factory.create_model("ViT-Test-8-CL32-GAP-BigVision").eval()
    info = export.export_open_clip(ours, str(tmp_path / "v2") + "/")
    assert (
        sorted(os.listdir(tmp_path / "v2"))
        == sorted(info["files"])
        == sorted(
            [
                "README.md",
                "open_clip_config.json",
                "open_clip_model.safetensors",
                "special_tokens_map.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "vocab.txt",
            ]
        )
    )
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'v2'}")
    oc_tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'v2'}")
    tok = factory.get_tokenizer(ours.cfg, reduction="truncate")
    caps = [
        "a photo of a dog.",
        "A Man riding a WAVE on top of a surfboard!",
        "café, naïve résumé 北京",
        "two  spaces\tand a tab",
        "x" * 120,
        "don't stop: 3.5 km/h",
    ]
    assert torch.equal(oc_tok(caps), tok(caps))
    long = " ".join(["word"] * 40)
    assert oc_tok([long])[0].tolist() == tok([long])[0].tolist()[:31] + [0]
    with torch.no_grad():
        t = tok(caps)
        assert_same(ours.encode_text(t), oc.encode_text(oc_tok(caps)))
    # the v1 directory needs no tokenizer files: OpenCLIP's own BPE at our context length
    v1 = export.export_open_clip(factory.create_model("ViT-Test-8-CL16"), str(tmp_path / "v1") + "/")
    assert "tokenizer.json" not in v1["files"]
    oc_tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'v1'}")
    assert torch.equal(oc_tok(caps), factory.get_tokenizer("ViT-Test-8-CL16", reduction="truncate")(caps))


# ----------------------------------------------------------------------------- weight layouts users have


def _layout_case(kind, tmp_path):
    """(OpenCLIP model, its config, a file in the layout users have, our model name)."""
    if kind == "clipa-v1 openclip file":  # the CLIPA-v1 releases: OpenCLIP ViT-L-16 at 16 tokens
        cfg = oc_config("ViT-L-16", {"layers": 1, "image_size": 64}, {"layers": 1, "context_length": 16})
        ours, path = shrink("ViT-L-16-CL16-GAP", 1, image_size=64), tmp_path / "clipa_v1_l16.pt"
        oc = oc_build(cfg)
        torch.save(oc.state_dict(), path)
    elif kind == "clipa-v2 converted file":  # the authors' converted v2 weights: open_clip_pytorch_model.bin
        cfg = oc_config("ViT-H-14-CLIPA", {"layers": 1, "image_size": 56, **TANH}, {"layers": 1, **TANH})
        ours, path = shrink("ViT-H-14-CL32-GAP-BigVision", 1, image_size=56), tmp_path / "open_clip_pytorch_model.bin"
        oc = oc_build(cfg)
        torch.save(oc.state_dict(), path)
    elif kind == "openclip ViT-bigG-14-CLIPA-336 safetensors":
        cfg = oc_config("ViT-bigG-14-CLIPA-336", {"layers": 1, **TANH}, {"layers": 1, **TANH})
        ours = shrink("ViT-bigG-14-CL32-GAP-BigVision", 1, image_size=336)
        path = tmp_path / "open_clip_model.safetensors"
        oc = oc_build(cfg)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    else:  # an OpenCLIP training checkpoint (DDP): epoch_K.pt
        cfg = oc_config("ViT-B-16", {"layers": 1, "image_size": 64}, {"layers": 1, "context_length": 16})
        ours, path = shrink("ViT-B-16-CL16", 1, image_size=64), tmp_path / "epoch_3.pt"
        oc = oc_build(cfg)
        torch.save(
            {
                "epoch": 3,
                "name": "run",
                "state_dict": {"module." + k: v for k, v in oc.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []},
            },
            path,
        )
    return oc, cfg, path, ours


@pytest.mark.parametrize(
    "kind",
    [
        "clipa-v1 openclip file",
        "clipa-v2 converted file",
        "openclip ViT-bigG-14-CLIPA-336 safetensors",
        "openclip training checkpoint",
    ],
)
def test_weight_layouts_users_have_load_exactly(kind, tmp_path):
    """Every tensor arrives bit for bit, and both towers give OpenCLIP's features
    (v1 GAP pools differently by design: its text tower and its tokens are compared)."""
    oc, cfg, path, ours_cfg = _layout_case(kind, tmp_path)
    ours = factory.create_model(ours_cfg, pretrained=path).eval()
    theirs = oc.state_dict()
    mine = factory.to_openclip_keys(ours.state_dict())
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k
    size = ours_cfg.vision.image_size
    img, ctx = torch.randn(2, 3, size, size), ours_cfg.text.context_length
    txt = v1_tokens(2, ctx) if ours_cfg.family == "v1" else torch.randint(0, 30000, (2, ctx))
    with torch.no_grad():
        assert_same(oc.encode_text(txt), ours.encode_text(txt))
        if ours_cfg.vision.pool != "gap_cls":
            assert_same(oc.encode_image(img), ours.encode_image(img))


def test_v1_gap_against_hand_reference(tmp_path):
    """v1 GAP = mean over ALL tokens (CLS included) -> ln_post -> proj. The tokens come from OpenCLIP's
    own tower (same weights); the pooling is written out by hand. OpenCLIP's 'avg' pool (patch tokens
    only) is a different function, which the last assertion shows."""
    torch.manual_seed(5)
    cfg = M.get_model_config("ViT-Tiny-8-CL16-Syntax-GAP")
    assert cfg.vision.pool == "gap_cls"
    ours = M.CLIP(cfg).eval()
    oc_cfg = export.openclip_model_cfg(cfg)
    oc = OpenCLIP(**oc_cfg).eval()
    oc.load_state_dict(factory.to_openclip_keys(ours.state_dict()), strict=True)
    img = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        inter = oc.visual.forward_intermediates(
            img, indices=1, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        tokens = torch.cat([inter["image_intermediates_prefix"][-1], inter["image_intermediates"][-1]], 1)
        assert tokens.shape == (3, 1 + 64, 128)
        ln = oc.visual.ln_post
        by_hand = F.layer_norm(tokens.mean(dim=1), (128,), ln.weight, ln.bias, ln.eps) @ oc.visual.proj
        assert_same(by_hand, ours.encode_image(img))
        assert not torch.allclose(oc.encode_image(img), by_hand, atol=1e-3)


@pytest.mark.parametrize(
    "name",
    [
        "ViT-B-16-CL16",
        "ViT-L-16-CL8-Syntax-GAP",
        "ViT-H-14-CL32-GAP",
        "ViT-L-14-CL32-GAP-BigVision",
        "ViT-H-14-CLIPA-336",
        "ViT-bigG-14-CL32-GAP-BigVision",
    ],
)
def test_full_size_models_map_to_openclip_names(name):
    """The printed OpenCLIP name (+ overrides) builds a model whose state dict has exactly our exported
    keys and shapes. Built on the meta device: full size, no memory, no time."""
    cfg = M.get_model_config(name)
    oc_name, kwargs, _ = export.openclip_target(cfg)
    assert oc_name is not None
    oc_cfg = open_clip.get_model_config(oc_name)
    if "force_context_length" in kwargs:
        oc_cfg["text_cfg"]["context_length"] = kwargs["force_context_length"]
    if "force_image_size" in kwargs:
        oc_cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"]
    with torch.device("meta"):
        ours = {k: v.shape for k, v in factory.to_openclip_keys(M.CLIP(cfg).state_dict()).items()}
        theirs = {k: v.shape for k, v in OpenCLIP(**oc_cfg).state_dict().items()}
    assert ours == theirs


def test_wrong_architecture_is_a_one_line_error(v1_openclip, capsys):
    _, _, path = v1_openclip
    with pytest.raises(ValueError, match=r"openclip-v1 layout.*missing visual\.transformer\.resblocks\.2") as e:
        factory.create_model(shrink("ViT-B-16-CL16", 3), pretrained=path)  # 3 layers vs 2
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unexpected visual.ln_pre.weight") as e:
        factory.create_model(shrink("ViT-L-14-CL32-GAP-BigVision", 2), pretrained=path)
    assert "shape mismatch" in str(e.value) and "\n" not in str(e.value)
    assert export.main([str(path), "--to", "open_clip", "/tmp/x.pt"]) == 2  # no config recorded
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--model" in err and err.count("\n") == 1


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    net = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    save_file(net.state_dict(), str(path), metadata=factory.weights_metadata("ViT-Test-8-CL16", net.cfg))
    out = str(tmp_path / "x.pt")
    for args, msg in (
        ([path, "--to", "open_clip", tmp_path / "no" / "x.pt"], "output directory does not"),
        ([tmp_path / "nope.pt", "--to", "open_clip", out], "checkpoint not found"),
        ([path, "--to", "open_clip", out, "--model", "ViT-Q-99"], "unknown model"),
        ([path, "--to", "open_clip", out, "--results", tmp_path / "r.json"], "results file not found"),
        ([path, "--to", "tf", out], "invalid choice"),
    ):
        try:
            rc = export.main([str(a) for a in args])
        except SystemExit as e:  # argparse errors exit from inside
            rc = e.code
        captured = capsys.readouterr()
        assert rc == 2 and captured.err.startswith("error: ") and msg in captured.err, captured.err
        assert captured.err.count("\n") == 1 and not captured.out
    assert not os.path.exists(out)


def test_export_into_a_non_empty_directory_needs_force(tmp_path, capsys):
    """A directory export into a directory that holds anything (a user's README.md, a clone's
    .gitattributes, an earlier export) is refused in one line, exit 2, before the checkpoint is read
    and with nothing written. --force replaces the export's files and says which, removes an earlier
    export's files this one does not write (a WordPiece tokenizer under a BPE model) and keeps the
    rest; a link in place of one of its files is refused, its target untouched."""
    from safetensors.torch import save_file

    net = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    ckpt = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(ckpt), metadata=factory.weights_metadata("ViT-Test-8-CL16", net.cfg))
    out = tmp_path / "hub"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    export.export_open_clip(factory.create_model("ViT-Test-8-CL32-GAP-BigVision"), str(out) + "/")  # WordPiece
    (out / "README.md").write_text("my notes\n")
    before = sorted(os.listdir(out))
    assert "tokenizer.json" in before and "vocab.txt" in before
    for target in (str(out) + "/", str(out)):
        rc = export.main([str(tmp_path / "missing.pt"), "--to", "open_clip", target])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{out} is not empty" in err and "--force" in err, err
    assert sorted(os.listdir(out)) == before and (out / "README.md").read_text() == "my notes\n"

    assert export.main([str(ckpt), "--to", "open_clip", str(out) + "/", "--force"]) == 0
    err = capsys.readouterr().err
    assert "replacing" in err and "README.md" in err and "open_clip_config.json" in err, err
    assert "removing" in err and "tokenizer.json" in err and "vocab.txt" in err, err
    assert sorted(os.listdir(out)) == [".gitattributes", "README.md", "open_clip_config.json", WEIGHTS_FILE]
    assert (out / "README.md").read_text().startswith("---") and (out / ".gitattributes").exists()

    secret = tmp_path / "secret.txt"
    secret.write_text("keep\n")
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(secret)
    assert export.main([str(ckpt), "--to", "open_clip", str(out) + "/", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "README.md is not a regular file" in err and err.count("\n") == 1, err
    assert secret.read_text() == "keep\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main([str(ckpt), "--to", "open_clip", str(empty)]) == 0  # an empty directory needs no --force
    assert "README.md" in os.listdir(empty)


@pytest.mark.parametrize("width,grid", [(32, 8), (768, 7), (1280, 6)])
def test_sincos_table_matches_openclip(width, grid):
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    ref = torch.from_numpy(get_2d_sincos_pos_embed(width, grid, cls_token=True)).float()
    torch.testing.assert_close(M.sincos_2d(width, grid), ref, rtol=0, atol=1e-6)


def test_model_card_records_recipe_samples_flops_and_results(tmp_path, capsys):
    """The export directory's README.md: architecture, the preset's stages, samples seen, training
    FLOPs (3 x forward x samples, as train.py --flops), and the evaluations found for the checkpoint.
    The train state is laid out as train.py saves it (stage dicts of its presets, weights_only)."""
    import dataclasses

    stages = [
        dataclasses.replace(s, train_num_samples=n, batch_size=16)
        for s, n in zip(config.PRESETS["demo"].stages, (128, 64))
    ]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000012"
    ckpt.mkdir(parents=True)
    cfg = stages[1].model_config()
    net = M.CLIP(cfg)
    from safetensors.torch import save_file

    save_file(
        net.state_dict(), str(ckpt / "model.safetensors"), metadata=factory.weights_metadata(stages[1].model, cfg)
    )
    run_config = {"run": {"cfg": "demo", "pretrained": None}, "stages": [dataclasses.asdict(s) for s in stages]}
    torch.save(
        {
            "step": 12,
            "stage_index": 1,
            "stage_name": "finetune",
            "stage_step": 4,
            "samples": 64,
            "config": json.dumps(run_config),
            "optimizer": {"state": {}, "param_groups": []},
        },
        ckpt / "train_state.pt",
    )
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000012\n")
    (tmp_path / "run" / "metrics.jsonl").write_text(
        json.dumps({"step": 12, "stage": "finetune", "eval_top1": 0.25, "eval_top5": 0.75, "eval_n": 72}) + "\n"
    )
    (ckpt / "zeroshot_val.json").write_text(
        json.dumps({"dataset": "/data/val", "top1": 0.5, "top5": 0.9, "n": 72, "num_classes": 36})
    )
    assert export.main([str(tmp_path / "run"), "--to", "open_clip", str(tmp_path / "out") + "/"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    pre, fin = (M.count_flops(s.model_config(), mask_ratio=s.mask_ratio)["total_gflops"] for s in stages)
    eflops = 3 * (pre * 128 + fin * 64) / 1e9
    assert "# ViT-Tiny-8-CL32-GAP (CLIPA-v1)" in card and "library_name: open_clip" in card
    assert "Preset `demo`" in card and "192 samples seen" in card and f"{eflops:.4g} training EFLOPs" in card
    assert "| pretrain | ViT-Tiny-8-CL16-Syntax-GAP | 32 | 16 (syntax) | - | 16 | 128 | 128 |" in card
    assert "| finetune | ViT-Tiny-8-CL32-GAP | 64 | 32 (truncate) | random 30% | 16 | 64 | 64 |" in card
    assert "| val | zero-shot classification (36 classes, 72 images) | top-1 50.00%, top-5 90.00% |" in card
    assert "training-time eval, step 12 (finetune)" in card and "top-1 25.00%" in card
    assert "v1 GAP (mean over all tokens incl. CLS) has no OpenCLIP 3.3 equivalent" in card
    assert "huggingface-cli upload ORG/NAME" in capsys.readouterr().out
