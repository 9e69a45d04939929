"""factory.py on its own: models by name and from weights files, the layouts and position tables of
loaded weights, the tokenizer a model implies, and one-line errors for files that are not what they
claim. Tiny configs only (CPU, seconds). OpenCLIP's own files are in test_interop.py."""

import json
import os
import re
import subprocess
import warnings

import pytest
import torch
from safetensors.torch import save_file

import export
import factory
import model as M


def _main(capsys, *args):
    try:
        rc = factory.main(list(args))
    except SystemExit as e:  # argparse errors exit from inside
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _export_main(capsys, *args):
    try:
        rc = export.main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _save_ours(path, name="ViT-Test-8-CL16", **over):
    cfg = M.get_model_config(name, **over)
    m = M.CLIP(cfg)
    save_file(m.state_dict(), str(path), metadata=factory.weights_metadata(name, cfg))
    return m


# ----------------------------------------------------------------------------- by name


def test_create_model_by_name_alias_or_config():
    torch.manual_seed(0)
    by_name = factory.create_model("ViT-L-16-CL8-SyntaxMask-GAP", image_size=32, pos_embed="learnable")
    assert by_name.cfg == M.get_model_config("ViT-L-16-CL8-Syntax-GAP", image_size=32, pos_embed="learnable")
    cfg = M.get_model_config("ViT-Test-8-CL16")
    m = factory.create_model(cfg, context_length=8, mask="random", mask_ratio=0.25)
    assert (m.cfg.text.context_length, m.cfg.vision.mask, m.cfg.vision.mask_ratio) == (8, "random", 0.25)
    assert m.text.positional_embedding.shape == (8, cfg.text.width)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"did you mean: .*ViT-H-14-CL32-GAP") as e:
        factory.create_model("ViT-H-14-CL32-GAPP")
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
    with pytest.raises(ValueError, match=msg) as e:
        factory.create_model("ViT-Test-8-CL16", **kw)
    assert "\n" not in str(e.value)


def test_get_tokenizer_follows_the_model():
    """Defaults: the model's context length and training reduction; both can be overridden."""
    tok = factory.get_tokenizer("ViT-L-16-CL8-Syntax-GAP")
    assert (tok.tokenizer, tok.context_length, tok.reduction) == ("clip_bpe", 8, "syntax")
    tok = factory.get_tokenizer("ViT-L-14-CLIPA", context_length=16, reduction="truncate")
    assert (tok.tokenizer, tok.context_length, tok.reduction) == ("wordpiece", 16, "truncate")
    assert tok(["a photo of a dog"]).shape == (1, 16)
    cfg = M.get_model_config("ViT-Tiny-8-CL16-Syntax-GAP", context_length=12)  # a config: its own text
    assert repr(factory.get_tokenizer(cfg)) == "Tokenizer('clip_bpe', context_length=12, reduction='syntax')"
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        factory.get_tokenizer("ViT-Q-99")
    with pytest.raises(ValueError, match="context_length must be an int >= 2, got 0"):
        factory.get_tokenizer("ViT-B-16-CL16", context_length=0)


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
        ([], "required"),
    ):
        rc, out, err = _main(capsys, *bad)
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1 and not out, err


# ----------------------------------------------------------------------------- layouts, position tables


def test_layouts_are_detected_and_key_maps_invert():
    sd = M.CLIP(M.get_model_config("ViT-Test-8-CL16")).state_dict()
    oc = factory.to_openclip_keys(sd)
    assert "token_embedding.weight" in oc and "text.token_embedding.weight" not in oc
    assert factory.detect_layout(sd) == "clipa"
    assert factory.detect_layout(oc) == "openclip-v1"
    assert factory.to_clipa_keys(oc).keys() == sd.keys()
    v2 = factory.to_openclip_keys(M.CLIP(M.get_model_config("ViT-Test-8-CL32-GAP-BigVision")).state_dict())
    assert factory.detect_layout(v2) == "openclip-v2"
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        factory.detect_layout({"w": torch.zeros(1)})


def test_sincos_table_is_a_buffer_recomputed_for_any_grid(tmp_path):
    cfg = M.get_model_config("ViT-Test-8-CL16", image_size=64, pos_embed="sincos")
    m64 = M.CLIP(cfg)
    assert "visual.positional_embedding" in dict(m64.named_buffers())
    assert "visual.positional_embedding" not in dict(m64.named_parameters())
    path = tmp_path / "w.safetensors"
    save_file(m64.state_dict(), str(path))
    m96 = factory.create_model(cfg, image_size=96, pretrained=path)
    torch.testing.assert_close(m96.visual.positional_embedding, M.sincos_2d(32, 12), rtol=0, atol=0)
    # fine-tuning: a learnable table starts from the pre-train table resized to the new grid
    ml = factory.create_model(cfg, image_size=96, pos_embed="learnable", pretrained=path)
    torch.testing.assert_close(ml.visual.positional_embedding, factory.resize_image_pos_embed(M.sincos_2d(32, 8), 12))
    torch.testing.assert_close(ml.visual.conv1.weight, m64.visual.conv1.weight)


def test_text_table_resizes_linearly(tmp_path):
    cfg = M.get_model_config("ViT-Test-8-CL16", context_length=8)
    m8 = M.CLIP(cfg)
    path = tmp_path / "w.pt"
    torch.save(m8.state_dict(), path)
    m32 = factory.create_model(cfg, context_length=32, pretrained=path)
    got = m32.text.positional_embedding
    assert got.shape == (32, 32)
    # linear interpolation of 8 points to 32 (align_corners=False): position j samples (j + .5) / 4 - .5
    src = m8.text.positional_embedding.detach()
    j = 13
    s = (j + 0.5) / 4 - 0.5
    lo = int(s)
    torch.testing.assert_close(got[j], src[lo] * (1 - (s - lo)) + src[lo + 1] * (s - lo))


def test_load_pretrained_into_a_built_model(tmp_path):
    """OpenCLIP-named weights of another context length load into an existing model; strict=False
    lets a partial state dict through, keeping the model's own tensors for the rest."""
    torch.manual_seed(0)
    src = M.CLIP(M.get_model_config("ViT-Test-8-CL16", context_length=8))
    path = tmp_path / "oc.pt"
    torch.save(factory.to_openclip_keys(src.state_dict()), path)
    dst = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    assert factory.load_pretrained(dst, path) == "openclip-v1"
    torch.testing.assert_close(dst.visual.proj, src.visual.proj, rtol=0, atol=0)
    assert dst.text.positional_embedding.shape == (16, 32) and dst.nonfinite_weights == []
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in src.state_dict().items() if k != "visual.proj"}, partial)
    fresh = M.CLIP(M.get_model_config("ViT-Test-8-CL16", context_length=8))
    own_proj = fresh.visual.proj.detach().clone()
    with pytest.raises(ValueError, match="missing visual.proj"):
        factory.load_pretrained(fresh, partial)
    assert factory.load_pretrained(fresh, partial, strict=False) == "clipa"
    torch.testing.assert_close(fresh.visual.proj, own_proj, rtol=0, atol=0)
    torch.testing.assert_close(fresh.text.text_projection, src.text.text_projection, rtol=0, atol=0)


# ----------------------------------------------------------------------------- our checkpoints


def test_our_checkpoint_records_its_config(tmp_path):
    torch.manual_seed(0)
    cfg = M.get_model_config("ViT-Test-8-CL32-GAP-BigVision", image_size=48)
    m = M.CLIP(cfg).eval()
    ckpt = tmp_path / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    save_file(m.state_dict(), str(ckpt / "model.safetensors"), metadata=factory.weights_metadata("x", cfg))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010\n")
    for path in (ckpt, ckpt / "model.safetensors", tmp_path):  # dir, file, run dir
        assert factory.config_from_metadata(factory.read_metadata(path)) == cfg
        m2 = factory.create_model(None, pretrained=path).eval()
        img = torch.randn(2, 3, 48, 48)
        torch.testing.assert_close(m2.encode_image(img), m.encode_image(img), rtol=0, atol=0)


def test_check_weights_fit_compares_names_and_shapes(tmp_path):
    path = tmp_path / "w.safetensors"
    m = _save_ours(path)
    factory.check_weights_fit(path, m.cfg)
    with pytest.raises(ValueError, match=r"does not hold weights of this model .*e\.g\. text\.positional_embedding"):
        factory.check_weights_fit(path, M.get_model_config("ViT-Test-8-CL16", context_length=8))


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        factory.create_model("ViT-Test-8-CL16", pretrained=tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        factory.create_model("ViT-Test-8-CL16", pretrained=tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not weights\n")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cls": subprocess.Popen}, evil)  # arbitrary object
    for path, msg in ((text, "not a torch checkpoint"), (fake, "not a readable safetensors"), (evil, "weights_only")):
        with pytest.raises(ValueError, match=msg) as e:
            factory.create_model("ViT-Test-8-CL16", pretrained=path)
        assert "\n" not in str(e.value)
    # wrong architecture: v2 weights into a v1 model
    v2 = tmp_path / "v2.pt"
    torch.save(M.CLIP(M.get_model_config("ViT-Test-8-CL32-GAP-BigVision")).state_dict(), v2)
    with pytest.raises(ValueError, match=r"missing visual\.ln_pre\.weight.*shape mismatch text\.token_embedding") as e:
        factory.create_model("ViT-Test-8-CL16", pretrained=v2)
    assert "\n" not in str(e.value)


def test_metadata_is_read_from_the_header_alone(tmp_path):
    """A file whose tensor bytes are cut off still yields its metadata (only the header is read),
    while its weights are a clean error."""
    full = tmp_path / "full.safetensors"
    m = _save_ours(full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-1000])
    meta = factory.read_metadata(cut)
    assert meta["model_name"] == "ViT-Test-8-CL16" and factory.config_from_metadata(meta) == m.cfg
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        factory.read_weights(cut)
    pt = tmp_path / "w.pt"
    torch.save(m.state_dict(), pt)
    assert factory.read_metadata(pt) == {}  # torch files record none


def test_create_model_from_metadata_reads_the_weights_once(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    src = _save_ours(path, image_size=48)
    reads = []
    load_file = factory.load_file

    def counted_load_file(file):
        reads.append(file)
        return load_file(file)

    monkeypatch.setattr(factory, "load_file", counted_load_file)
    m = factory.create_model(None, pretrained=path)
    assert reads == [str(path)] and m.cfg == src.cfg
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_create_model_and_transforms_returns_eval_mode(tmp_path):
    """A fine-tune checkpoint (30% random image masking) comes back in eval mode, as OpenCLIP's does:
    no tokens dropped, the same features every call."""
    path = tmp_path / "ft.safetensors"
    _save_ours(path, mask="random", mask_ratio=0.3)
    model, _, _ = factory.create_model_and_transforms(None, pretrained=path)
    unmasked = factory.create_model(None, pretrained=path, mask="none", mask_ratio=0.0).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(img), unmasked.encode_image(img), rtol=0, atol=0)


# ----------------------------------------------------------------------------- hostile configs, NaN weights


def _crafted(path, vision=None, text=None, top=None):
    """Our weights file (ViT-Test-8-CL16 tensors) whose header config was edited by hand."""
    m = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    cfg = json.loads(factory.weights_metadata("ViT-Test-8-CL16", m.cfg)["model_config"])
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
        factory.create_model(None, pretrained=path)
    assert "\n" not in str(e.value)
    rc, stdout, err = _export_main(capsys, str(path), "--to", "open_clip", str(tmp_path / "out") + "/")
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out")


def test_a_config_that_does_not_fit_the_tensors_allocates_nothing(tmp_path, monkeypatch):
    """Within the limits but not what the file holds (160 text layers of width 2048: 33 GB were
    it built): refused from the meta model's shapes, before any memory is allocated."""
    path = _crafted(tmp_path / "big.safetensors", None, {"layers": 160, "width": 2048, "heads": 16})
    assert M.count_parameters(factory.config_from_metadata(factory.read_metadata(path))) < M.MAX_PARAMETERS
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(ValueError, match="does not fit this v1 architecture: missing text.transformer.resblocks.2"):
        factory.create_model(None, pretrained=path)


def test_nonfinite_weights_load_with_a_warning(tmp_path, capsys):
    """NaN/Inf weights load (a user may want to inspect them) with a warning naming
    them; the export says so in one line."""
    m = M.CLIP(M.get_model_config("ViT-Test-8-CL16"))
    sd = m.state_dict()
    sd["visual.proj"][0, 0] = float("nan")
    sd["text.ln_final.weight"][3] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path), metadata=factory.weights_metadata("ViT-Test-8-CL16", m.cfg))
    with pytest.warns(
        factory.NonFiniteWeightsWarning, match="non-finite weights .* in 2 tensors: text.ln_final.weight, visual.proj"
    ):
        loaded = factory.create_model(None, pretrained=path)
    assert sorted(loaded.nonfinite_weights) == ["text.ln_final.weight", "visual.proj"]
    rc, stdout, err = _export_main(capsys, str(path), "--to", "open_clip", str(tmp_path / "x.safetensors"))
    assert rc == 0 and err.count("\n") == 1 and err.startswith("warning: ") and "non-finite" in err, err
    good = tmp_path / "good.safetensors"
    _save_ours(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert factory.create_model(None, pretrained=good).nonfinite_weights == []
