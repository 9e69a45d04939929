"""Zero-shot evaluation against OpenCLIP 3.3.0's own zero-shot code on the same weights and images.

The reference side uses only OpenCLIP: its CLIP class, tokenizers, image_transform,
build_zero_shot_classifier and open_clip_train.zero_shot.run (the loop its training script uses).
Random weights, so the models are tiny; a seed is picked for which the random model's predictions
are spread over several classes and its accuracy is strictly between 0 and 1 (so "equal accuracy"
can't come from a constant predictor), and the per-image predictions are compared too.
"""

import argparse
import json
import os
import subprocess
import sys

import captioned
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from runs import PY, env, free_port, losses, run, tiny_demo_args, train

import data
import eval_zeroshot as Z
import factory
import model as M
import tokenizer as T
import transforms
import xla_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSNAMES = ["goldfish", "tabby cat", "fire truck", "volcano", "pizza", "umbrella"]
# tiny models on a shared 2-core machine: a second intra-op thread only adds contention
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder val/ tree: 6 classes x 4 JPEGs of mixed sizes and aspect ratios (some over twice
    the 32 px eval size, where a reduced-scale JPEG decode would change the pixels)."""
    root = tmp_path_factory.mktemp("zs") / "val"
    rng = np.random.default_rng(0)
    for c in range(len(CLASSNAMES)):
        os.makedirs(root / f"n0{c}", exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(4):
            h, w = (int(v) for v in rng.integers(36, 110, 2))
            blocks = rng.normal(base, 60, (h // 6 + 1, w // 6 + 1, 3)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(blocks).resize((w, h), Image.BICUBIC)
            img.save(root / f"n0{c}" / f"{i}.JPEG", quality=90)
    return str(root)


def _names_file(tmp_path, names=CLASSNAMES):
    p = tmp_path / "classnames.txt"
    p.write_text("\n".join(names) + "\n")
    return str(p)


@pytest.fixture(scope="module")
def cpu():
    return xla_utils.init_runtime("cpu")


def _perturb(module, seed):
    # OpenCLIP zero-inits biases and ones-inits norms: randomise everything so every weight matters
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def _openclip_v1(seed):
    """OpenCLIP CLIP with the architecture of our registry's ViT-Test-8-CL16."""
    import open_clip

    torch.manual_seed(seed)
    oc = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
    )
    return _perturb(oc, seed)


def _openclip_v2(seed):
    """OpenCLIP CLIP laid out like its ViT-*-14-CLIPA models (no ln_pre, patch-average pooling then
    the final norm, bidirectional text pooled at the last position, tanh GELU) at the size of our
    registry's ViT-Test-8-CL32-GAP-BigVision."""
    import open_clip

    torch.manual_seed(seed)
    act = {"approximate": "tanh"}
    oc = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(
            image_size=32,
            patch_size=8,
            width=32,
            layers=2,
            head_width=16,
            no_ln_pre=True,
            pool_type="avg",
            final_ln_after_pool=True,
            act_kwargs=act,
        ),
        text_cfg=dict(
            context_length=32,
            vocab_size=32000,
            width=32,
            heads=2,
            layers=2,
            pool_type="last",
            no_causal_mask=True,
            act_kwargs=act,
        ),
    )
    return _perturb(oc, seed)


def _openclip_predictions(oc, tokenizer, preprocess, root, templates):
    """OpenCLIP's classifier (build_zero_shot_classifier) and per-image predictions."""
    import open_clip
    import torchvision

    W = open_clip.build_zero_shot_classifier(
        oc, tokenizer, CLASSNAMES, templates, num_classes_per_batch=4, device="cpu"
    )
    ds = torchvision.datasets.ImageFolder(root, transform=preprocess)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        preds = (100.0 * oc.encode_image(x, normalize=True) @ W).argmax(-1)
    return W, preds, torch.tensor(ds.targets), ds


def _pick_seed(build, tokenizer, preprocess, root, templates):
    """First seed whose random model is not a (near) constant predictor on this set, and OpenCLIP's
    zero-shot evaluation of it: (model, (top1, top5, mean per-class recall, predictions, weights))."""
    from open_clip_train.zero_shot import run

    for seed in range(20):
        oc = build(seed)
        W, preds, y, ds = _openclip_predictions(oc, tokenizer, preprocess, root, templates)
        if len(set(preds.tolist())) >= 3 and 0 < (preds == y).sum() < len(y):
            break
    else:
        pytest.fail("no seed in 0..19 gives a random model with spread-out predictions")
    # OpenCLIP's own evaluation loop (what its training script reports)
    dl = torch.utils.data.DataLoader(ds, batch_size=5)
    top1, top5 = run(oc, W, dl, argparse.Namespace(device="cpu", precision="fp32", batch_size=5))
    recall = float(np.mean([(preds[y == c] == c).double().mean().item() for c in range(len(CLASSNAMES))]))
    return oc, (top1, top5, recall, preds, W)


def _our_predictions(net, cfg, root, templates):
    """Per-image predictions through this module's public pieces (what evaluate() does)."""
    pre = Z.Preprocess.for_model(cfg)
    W = Z.build_classifier(
        net,
        factory.get_tokenizer(cfg, reduction="truncate"),
        CLASSNAMES,
        templates,
        runtime=xla_utils.init_runtime("cpu"),
        batch_size=7,
    )
    loader, classes = data.make_eval_loader(root, pre.transform(), 5, num_workers=0)
    preds, images = [], []
    with torch.no_grad():
        for x, _ in loader:
            x = transforms.normalize(x, pre.image_mean, pre.image_std)
            images.append(x)
            preds.append((100.0 * net.encode_image(x, normalize=True) @ W).argmax(-1))
    return torch.cat(preds), torch.cat(images), W


def _run_cli(args):
    try:
        return Z.main([*map(str, args), "--workers", "0", "--device", "cpu", "--no-progress"])
    except SystemExit as e:  # argparse errors exit from inside
        return e.code


# ----------------------------------------------------------------------------- vs OpenCLIP


def test_v1_zero_shot_equals_openclip(folder, tmp_path):
    import open_clip
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    preprocess = open_clip.image_transform(
        32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    oc, (top1, top5, recall, preds_ref, W_ref) = _pick_seed(
        _openclip_v1, tok, preprocess, folder, SIMPLE_IMAGENET_TEMPLATES
    )
    ckpt = tmp_path / "openclip_v1.pt"
    torch.save(oc.state_dict(), ckpt)  # an OpenCLIP state dict, as OpenCLIP users have them

    out = tmp_path / "res.json"
    assert (
        _run_cli(
            [
                "--ckpt",
                ckpt,
                "--model",
                "ViT-Test-8-CL16",
                "--data",
                folder,
                "--classnames",
                _names_file(tmp_path),
                "--templates",
                "short",
                "--batch-size",
                4,
                "--out",
                out,
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["top1"] == top1 and res["top5"] == top5  # exactly: same images right / wrong
    assert res["mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    assert res["n"] == 24 and res["num_classes"] == 6 and res["num_templates"] == 7
    assert res["context_length"] == 16 and res["interpolation"] == "bicubic"
    assert res["square_resize_only"] is False and res["image_mean"] == list(M.OPENAI_MEAN)

    # the full picture, not just the counts: same classifier, same pixels, same per-image answers
    net = factory.create_model("ViT-Test-8-CL16", pretrained=ckpt).eval()
    preds, images, W = _our_predictions(net, net.cfg, folder, Z.load_templates("short"))
    ref_images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in sorted(_image_paths(folder))])
    # uint8 resize may differ by one level on rare pixels: 1/255 of the smallest std
    assert (images - ref_images).abs().max() <= 1.01 / (255 * min(M.OPENAI_STD))
    assert torch.allclose(W, W_ref, atol=1e-5)
    assert torch.equal(preds, preds_ref)


def _image_paths(root):
    return [(os.path.join(dp, f), None) for dp, _, fs in os.walk(root) for f in fs]


def test_v2_cli_reads_metadata_and_equals_openclip(folder, tmp_path):
    """A v2 (BigVision) checkpoint of this project: the model comes from its metadata, the family's
    preprocessing (ImageNet mean/std, bilinear square resize) and OpenCLIP's CLIPA tokenizer path
    (bert-base-uncased WordPiece, [SEP] stripped, built from our shipped vocabulary)."""
    import open_clip
    import transformers
    from safetensors.torch import save_file

    hf_dir = tmp_path / "bert"
    transformers.BertTokenizerFast(vocab_file=T.BERT_VOCAB, do_lower_case=True).save_pretrained(hf_dir)
    tok = open_clip.tokenizer.HFTokenizer(str(hf_dir), context_length=32, strip_sep_token=True)
    preprocess = open_clip.image_transform(
        32, is_train=False, mean=M.IMAGENET_MEAN, std=M.IMAGENET_STD, resize_mode="squash", interpolation="bilinear"
    )
    templates = ["a photo of a {}.", "a blurry picture of the {}!", "{} in the wild"]
    oc, (top1, top5, recall, preds_ref, _) = _pick_seed(_openclip_v2, tok, preprocess, folder, templates)

    name = "ViT-Test-8-CL32-GAP-BigVision"
    cfg = M.get_model_config(name)
    net = M.CLIP(cfg)
    net.load_state_dict(factory.to_clipa_keys(oc.state_dict()))
    run_dir = tmp_path / "run" / "step_00000010"
    run_dir.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        run_dir / "model.safetensors",
        metadata=factory.weights_metadata(name, cfg),
    )
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")

    assert (
        _run_cli(
            [
                "--ckpt",
                run_dir,
                "--data",
                folder,
                "--classnames",
                _names_file(tmp_path),
                "--templates",
                tmp_path / "templates.txt",
            ]
        )
        == 0
    )
    out = run_dir / "zeroshot_val.json"  # default: next to the checkpoint
    res = json.loads(out.read_text())
    assert res["model"] == name and res["context_length"] == 32
    assert res["top1"] == top1 and res["top5"] == top5
    assert res["mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    assert res["image_mean"] == list(M.IMAGENET_MEAN) and res["interpolation"] == "bilinear"
    assert res["square_resize_only"] is True
    preds, _, _ = _our_predictions(net.eval(), cfg, folder, templates)
    assert torch.equal(preds, preds_ref)


# ----------------------------------------------------------------------------- evaluate() as train.py uses it


def test_evaluate_uses_eval_mode_and_restores_train_mode(folder, cpu):
    """Random image masking (train mode only) must not leak into evaluation; mode is restored."""
    net = factory.create_model("ViT-Test-8-CL16", mask="random", mask_ratio=0.5)
    cfg = net.cfg
    net.train()
    kw = dict(runtime=cpu, classnames=CLASSNAMES, templates="short", batch_size=8, num_workers=0)
    first = Z.evaluate(net, cfg, folder, **kw)
    assert net.training
    net.eval()
    second = Z.evaluate(net, cfg, folder, **kw)
    assert not net.training
    for k in ("top1", "top5", "mean_per_class_recall", "n"):
        assert first[k] == second[k]
    assert first["n"] == 24 and first["num_templates"] == 7


def test_evaluate_needs_a_runtime_and_honours_its_precision(folder, cpu):
    """evaluate() runs under the caller's Runtime (no device guessing); precision 'auto' is the
    runtime's rule (fp32 on the CPU), 'bf16' runs both towers under bf16 autocast."""
    torch.manual_seed(1)
    net = _perturb(factory.create_model("ViT-Test-8-CL16"), 1)
    kw = dict(classnames=CLASSNAMES, templates="short", batch_size=12, num_workers=0)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'runtime'"):
        Z.evaluate(net, net.cfg, folder, **kw)
    seen = []
    for tower in (net.visual, net.text):
        tower.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        seen.clear()
        res = Z.evaluate(net, net.cfg, folder, runtime=cpu, precision=precision, **kw)
        assert res["precision"] == cpu.precision(precision) and res["n"] == 24
        assert len(seen) == 1 + 2 and set(seen) == {dtype}, precision  # 1 prompt chunk, 2 image batches
    tok = factory.get_tokenizer(net.cfg, reduction="truncate")
    w32, w16 = (
        Z.build_classifier(net, tok, CLASSNAMES, ["a photo of a {}."], runtime=cpu, precision=p)
        for p in ("fp32", "bf16")
    )
    assert w32.dtype == w16.dtype == torch.float32 and not torch.equal(w32, w16)
    assert (w32 - w16).abs().max() < 0.05
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        Z.evaluate(net, net.cfg, folder, runtime=cpu, precision="fp16", **kw)


def test_model_transforms_and_evaluate_see_the_same_pixels(tmp_path):
    """The two doors to evaluation preprocessing - create_model_and_transforms' eval transform (a PIL
    image in) and evaluate()'s loader (JPEG bytes in) - give identical tensors on a large JPEG, and
    those are the full-resolution picture (a reduced-scale draft decode moves pixels 2-3 levels)."""
    import torchvision.transforms as TV

    rng = np.random.default_rng(1)
    fine = rng.normal(128, 60, (240, 320, 3)).clip(0, 255).astype(np.uint8)  # 4-px detail at 1280x960
    (tmp_path / "val" / "n00").mkdir(parents=True)
    path = tmp_path / "val" / "n00" / "big.JPEG"
    Image.fromarray(fine).resize((1280, 960), Image.BICUBIC).save(path, quality=90)
    for name in ("ViT-Test-8-CL16", "ViT-Test-8-CL32-GAP-BigVision"):
        _, _, preprocess = factory.create_model_and_transforms(name)
        pre = Z.Preprocess.for_model(M.get_model_config(name))
        loader, _ = data.make_eval_loader(tmp_path / "val", pre.transform(), 1, num_workers=0)
        ((images, _),) = list(loader)
        theirs = transforms.normalize(images, pre.image_mean, pre.image_std)[0]
        assert torch.equal(preprocess(Image.open(path)), theirs), name
        mode = TV.InterpolationMode(pre.interpolation)
        resize = [TV.Resize((32, 32), mode)] if pre.square_resize_only else [TV.Resize(32, mode), TV.CenterCrop(32)]
        ref = TV.Compose([*resize, TV.ToTensor(), TV.Normalize(pre.image_mean, pre.image_std)])(
            Image.open(path).convert("RGB")
        )
        assert (theirs - ref).abs().max() <= 1.01 / (255 * min(pre.image_std)), name


def test_check_eval_set_counts_classes_without_reading_images(tmp_path):
    """train.py runs this before its first step: a class-name list that does not match the set is a
    one-line error up front. Only the folders are listed: undecodable files do not matter here."""
    for c in ("n01", "n02", "n03"):
        (tmp_path / "val" / c).mkdir(parents=True)
        (tmp_path / "val" / c / "0.JPEG").write_bytes(b"not a jpeg")
    Z.check_eval_set(tmp_path / "val", ["a", "b", "c"])
    assert Z.eval_classes(tmp_path / "val") == ["n01", "n02", "n03"]
    with pytest.raises(ValueError, match=r"val has 3 classes but 2 class names were given") as e:
        Z.check_eval_set(tmp_path / "val", ["a", "b"])
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such evaluation directory"):
        Z.check_eval_set(tmp_path / "nope", ["a"])


def test_xla_matches_cpu_with_one_compile_per_graph(folder, cpu):
    """On an XLA device (PJRT CPU here, a TPU for users) the padded static-shape batches give the CPU
    result, and the text and image graphs are compiled once each, not once per batch."""
    import torch_xla.debug.metrics as met

    torch.manual_seed(5)
    net = _perturb(factory.create_model("ViT-Test-8-CL16"), 5)
    kw = dict(classnames=CLASSNAMES, templates="short", batch_size=5, text_batch_size=16, num_workers=0)
    on_cpu = Z.evaluate(net, net.cfg, folder, runtime=cpu, **kw)
    xla_rt = xla_utils.init_runtime("xla")
    compiles = lambda: (met.metric_data("CompileTime") or [0])[0]  # noqa: E731
    before = compiles()
    xla = Z.evaluate(net.to(xla_rt.device), net.cfg, folder, runtime=xla_rt, **kw)
    # 3 text chunks (42 prompts, last padded) + 5 image batches (last padded) -> 2 big graphs, plus
    # the small classifier-average and zero-counts graphs
    assert compiles() - before <= 4
    for k in ("top1", "top5", "mean_per_class_recall", "n"):
        assert xla[k] == on_cpu[k], k


def _tfds_copy(folder, root, splits=("validation",), name="zs_val"):
    """The ImageFolder as a TFDS dataset named `name` in data_dir `root`, each of `splits` holding it
    whole: same JPEG bytes, same label order."""
    import tensorflow_datasets as tfds

    classes = sorted(os.listdir(folder))

    class ZsVal(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(names=classes),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples() for split in splits}

        def _generate_examples(self):
            for label, c in enumerate(classes):
                for f in sorted(os.listdir(os.path.join(folder, c))):
                    yield f"{c}/{f}", {"image": os.path.join(folder, c, f), "label": label}

    ZsVal.name = name
    ZsVal(data_dir=str(root)).download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.path.join(str(root), name)


def test_tfds_validation_split_gives_the_imagefolder_result(folder, tmp_path):
    tfds_dir = _tfds_copy(folder, tmp_path / "tfds")
    torch.manual_seed(7)
    net = _perturb(factory.create_model("ViT-Test-8-CL16"), 7)
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    results = []
    for src in (["--data", folder], ["--data", tfds_dir, "--format", "tfds"]):
        out = tmp_path / f"r{len(results)}.json"
        assert (
            _run_cli(
                [
                    "--ckpt",
                    ckpt,
                    "--model",
                    "ViT-Test-8-CL16",
                    *src,
                    "--classnames",
                    _names_file(tmp_path),
                    "--templates",
                    "short",
                    "--out",
                    out,
                ]
            )
            == 0
        )
        results.append(json.loads(out.read_text()))
    for k in ("top1", "top5", "mean_per_class_recall", "n"):
        assert results[0][k] == results[1][k], k
    assert results[1]["n"] == 24 and 0 < results[1]["top1"] < 1 and results[1]["top5"] < 1


def test_weights_of_another_size_are_resized_with_one_warning_line(folder, tmp_path, capsys):
    """A weights file trained at 48 px, evaluated as the registry's 32 px model: the learned position
    table is resized and the run says from what to what; at its own size, nothing is said."""
    torch.manual_seed(3)
    ckpt = tmp_path / "w48.pt"
    torch.save(factory.create_model("ViT-Test-8-CL16", image_size=48).state_dict(), ckpt)
    args = ["--ckpt", ckpt, "--model", "ViT-Test-8-CL16", "--data", folder, "--classnames", _names_file(tmp_path)]
    args += ["--templates", "short", "--limit", "1"]
    assert _run_cli([*args, "--out", tmp_path / "a.json"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned == [
        f"warning: {ckpt}: image position table resized (bicubic) from 6x6 to 4x4 patches (48 px -> 32 px)"
    ]
    assert _run_cli([*args, "--force-image-size", "48", "--out", tmp_path / "b.json"]) == 0
    assert "warning:" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def tfds_root(folder, tmp_path_factory):
    """A TFDS data_dir with two datasets, neither with a 'validation' split: only_test (split test)
    and two_splits (train and test), each holding the `folder` set."""
    root = tmp_path_factory.mktemp("tfds_root")
    _tfds_copy(folder, root, ("test",), "only_test")
    _tfds_copy(folder, root, ("train", "test"), "two_splits")
    return root


def _score(tmp_path, data_args, name="r"):
    """(exit status, result JSON or None) of eval_zeroshot.py on a fixed perturbed test model."""
    torch.manual_seed(7)
    ckpt = tmp_path / "w.pt"
    if not ckpt.exists():
        torch.save(_perturb(factory.create_model("ViT-Test-8-CL16"), 7).state_dict(), ckpt)
    out = tmp_path / f"{name}.json"
    args = ["--ckpt", ckpt, "--model", "ViT-Test-8-CL16", *data_args, "--classnames", _names_file(tmp_path)]
    status = _run_cli([*args, "--templates", "short", "--out", out])
    return status, (json.loads(out.read_text()) if status == 0 else None)


def test_tfds_split_defaults_to_the_only_split_and_is_chosen_with_split(folder, tfds_root, tmp_path, capsys):
    """A set with only a test split is scored on it; --split picks one of several; without it, a set
    with several splits and no 'validation' is a one-line error listing them. Each TFDS result equals
    the ImageFolder's (the same images)."""
    status, want = _score(tmp_path, ["--data", folder], "folder")
    assert status == 0
    for name, data_args in (
        ("default", ["--data", tfds_root / "only_test"]),
        ("chosen", ["--data", tfds_root / "two_splits", "--split", "test"]),
    ):
        status, got = _score(tmp_path, data_args, name)
        assert status == 0, capsys.readouterr().err
        assert got["n"] == 24 and got["top1"] == want["top1"] and got["top5"] == want["top5"], name
    capsys.readouterr()
    for data_args, expect in (
        (["--data", tfds_root / "two_splits"], "no split 'validation' (has train, test): name one"),
        (["--data", tfds_root / "two_splits", "--split", "val"], "no split 'val' (has train, test)"),
        (["--data", folder, "--split", "test"], "an ImageFolder tree has no splits"),
    ):
        assert _score(tmp_path, data_args)[0] == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and "\n" not in err, err


def test_a_tfds_data_dir_with_several_datasets_asks_for_one(tfds_root, tmp_path, capsys):
    """Not the first dataset found, silently: one line naming them, exit 2."""
    assert _score(tmp_path, ["--data", tfds_root, "--format", "tfds"])[0] == 2
    err = capsys.readouterr().err.strip()
    assert "holds 2 TFDS datasets (only_test, two_splits): give one of them" in err and "\n" not in err, err
    with pytest.raises(ValueError, match="holds 2 TFDS datasets"):
        data.make_eval_loader(str(tfds_root), None, 1, num_workers=0)


@pytest.mark.slow
def test_training_evaluates_the_eval_split(demo_small, tfds_root, tmp_path):
    """train.py --eval-split: the zero-shot eval at the stage's end reads that split; a set whose
    default split is ambiguous is refused before the first step, in one line."""
    args = [
        "--stage",
        "pretrain",
        "--set",
        "pretrain.train_num_samples=32",
        "--eval-data",
        str(tfds_root / "two_splits"),
        "--eval-classnames",
        _names_file(tmp_path),
        "--eval-templates",
        "short",
    ]
    p = run([PY, "train.py", *tiny_demo_args(demo_small, tmp_path / "refused", *args)])
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].endswith("(has train, test): name one"), p.stderr
    out = tmp_path / "run"
    stdout = train(tiny_demo_args(demo_small, out, *args, "--eval-split", "test"))
    assert "zero-shot: top1" in stdout
    evals = [r for r in losses(out)[1] if "eval_top1" in r]
    assert len(evals) == 1 and evals[0]["eval_n"] == 24


def _dist_worker(rank, world, port, folder, sd, out_dir, captions=None):
    # what torchrun sets; the runtime starts the gloo process group from it
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    rt = xla_utils.init_runtime("cpu")
    torch.set_num_threads(1)
    net = factory.create_model("ViT-Test-8-CL16")
    net.load_state_dict(sd)
    res = Z.evaluate(
        net, net.cfg, folder, runtime=rt, classnames=CLASSNAMES, templates="short", batch_size=4, num_workers=0
    )
    if captions:
        res["retrieval"] = Z.evaluate_retrieval(net, net.cfg, captions, runtime=rt, batch_size=4, num_workers=0)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    rt.shutdown()


@pytest.mark.slow
def test_distributed_ranks_evaluate_shards_and_sum_counts(folder, captioned_sets, tmp_path, cpu):
    """Two gloo processes (each evaluates its half) report what one process reports for all; the
    same for retrieval (each encodes its part, the features are gathered)."""
    torch.manual_seed(3)
    net = factory.create_model("ViT-Test-8-CL16")
    sd = _perturb(net, 3).state_dict()
    single = Z.evaluate(
        net, net.cfg, folder, runtime=cpu, classnames=CLASSNAMES, templates="short", batch_size=4, num_workers=0
    )
    retrieval = Z.evaluate_retrieval(net, net.cfg, captioned_sets["shards"], runtime=cpu, batch_size=4, num_workers=0)
    port = free_port()
    torch.multiprocessing.start_processes(
        _dist_worker, args=(2, port, folder, sd, str(tmp_path), captioned_sets["shards"]), nprocs=2, start_method="fork"
    )
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for k in ("top1", "top5", "n"):
            assert res[k] == single[k], (r, k)
        for k in RECALLS + ["images", "texts", "skipped"]:
            assert res["retrieval"][k] == pytest.approx(retrieval[k], abs=1e-12), (r, k)
        assert res["mean_per_class_recall"] == pytest.approx(single["mean_per_class_recall"], abs=1e-12)


# ----------------------------------------------------------------------------- prompts


def test_prompts_are_truncated_not_syntax_masked():
    """A syntax-masked T16 model is evaluated with plain 16-token prompts, tokenized like OpenCLIP's
    tokenizer at that length (the reference syntax-masked its prompts: a defect)."""
    import open_clip

    name = "ViT-Tiny-8-CL16-Syntax-GAP"
    cfg = M.get_model_config(name)
    tok = factory.get_tokenizer(cfg, reduction="truncate")  # evaluate()'s default
    assert tok.context_length == 16 and tok.reduction == "truncate"
    prompts = [t.format("great white shark") for t in Z.load_templates("openai")]
    prompts.append("a very blurry and rather dark low resolution photo of the great white shark in the sea")
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=16)(prompts)
    assert torch.equal(tok(prompts), ref)
    # the training tokenizer of this model would have dropped words (syntax masking)
    assert not torch.equal(factory.get_tokenizer(name)(prompts[-1:]), ref[-1:])


# ----------------------------------------------------------------------------- data files


def test_classnames_and_templates_are_openclips():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    names = Z.load_classnames()
    assert len(names) == 1000 and names == list(IMAGENET_CLASSNAMES)
    openai, short = Z.load_templates("openai"), Z.load_templates("short")
    assert len(openai) == 80 and len(short) == 7
    for mine, ref in ((openai, OPENAI_IMAGENET_TEMPLATES), (short, SIMPLE_IMAGENET_TEMPLATES)):
        assert [t.format("tabby cat") for t in mine] == [t("tabby cat") for t in ref]


@pytest.mark.parametrize("bad", ["no placeholder here", "{} and {} twice"])
def test_bad_template_file(tmp_path, bad):
    p = tmp_path / "t.txt"
    p.write_text(f"a photo of a {{}}.\n{bad}\n")
    with pytest.raises(ValueError, match=f"exactly one '{{}}' placeholder; {p} has {bad!r}"):
        Z.load_templates(str(p))
    with pytest.raises(FileNotFoundError, match="templates file not found: nope.txt"):
        Z.load_templates("nope.txt")


# ----------------------------------------------------------------------------- usage example


def test_seed_usage_example_small_v2(tmp_path):
    """The README usage, verbatim but for the model name and size: a small v2 (BigVision) config,
    built at a larger image size than its checkpoint (position table resized), with explicit
    mean/std, bilinear, square resize."""
    import torchvision.transforms.functional as TF
    from safetensors.torch import save_file

    from factory import create_model_and_transforms, get_tokenizer

    name = "ViT-Test-8-CL32-GAP-BigVision"
    torch.manual_seed(0)
    src = _perturb(M.CLIP(M.get_model_config(name)), 0)
    CKPT = str(tmp_path / "v2.safetensors")
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()}, CKPT, metadata=factory.weights_metadata(name, src.cfg)
    )

    model, _, preprocess = create_model_and_transforms(
        "ViT-Test-8-CL32-GAP-BigVision",
        pretrained=CKPT,
        force_image_size=48,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        interpolation="bilinear",
        square_resize_only=True,
    )
    tokenizer = get_tokenizer("ViT-Test-8-CL32-GAP-BigVision")
    assert not model.training  # returned in eval mode, as OpenCLIP's

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 83, 3), dtype=np.uint8))
    image = preprocess(img).unsqueeze(0)
    text = tokenizer(["a diagram", "a dog", "a cat"])
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(text)
        image_features /= image_features.norm(dim=-1, keepdim=True)
        text_features /= text_features.norm(dim=-1, keepdim=True)
        text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)

    assert model.cfg.vision.image_size == 48 and model.visual.positional_embedding.shape[0] == 1 + 36
    ref = TF.normalize(
        TF.to_tensor(TF.resize(img, [48, 48], TF.InterpolationMode.BILINEAR)),
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )
    assert image.shape == (1, 3, 48, 48)
    assert (image[0] - ref).abs().max() <= 1.01 / (255 * 0.224)
    assert text.shape == (3, 32) and (text[:, 0] == 101).all() and not (text == 102).any()
    assert text_probs.shape == (1, 3) and torch.allclose(text_probs.sum(-1), torch.ones(1))
    # weights other than the resized position table are the checkpoint's
    for k, v in src.state_dict().items():
        if k != "visual.positional_embedding":
            assert torch.equal(model.state_dict()[k], v), k


def test_seed_usage_example_h14_call_path_on_meta_device():
    """The real ViT-H-14-CL32-GAP-BigVision at 336 px, without its ~1B weights: built on the meta
    device (shapes only), its parameters match OpenCLIP's ViT-H-14-CLIPA-336 one for one, a meta
    forward pass gives 1024-d features, and the transform/tokenizer of the same call are real.
    Not exercised: loading a real H/14 checkpoint (none here) and numerics at this size."""
    import open_clip

    from factory import create_model_and_transforms, get_tokenizer

    with torch.device("meta"):
        model, _, preprocess = create_model_and_transforms(
            "ViT-H-14-CL32-GAP-BigVision",
            force_image_size=336,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
            interpolation="bilinear",
            square_resize_only=True,
        )
        ref = open_clip.create_model("ViT-H-14-CLIPA-336", device="meta")
    tokenizer = get_tokenizer("ViT-H-14-CL32-GAP-BigVision")
    ours = {k: tuple(v.shape) for k, v in factory.to_openclip_keys(model.state_dict()).items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    feats = model.encode_image(torch.empty(2, 3, 336, 336, device="meta"))
    assert feats.shape == (2, 1024)
    img = Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8))
    assert preprocess(img).shape == (3, 336, 336)
    assert tokenizer(["a photo of a cat."]).shape == (1, 32)


# ----------------------------------------------------------------------------- CLI errors


@pytest.fixture(scope="module")
def v1_ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("ck") / "v1.pt"
    torch.save(factory.create_model("ViT-Test-8-CL16").state_dict(), p)
    return str(p)


CLI_ERRORS = {  # case -> (arguments after --ckpt V1 where given, expected message)
    "missing_ckpt": (
        ["--ckpt", "{tmp}/nope.pt", "--model", "ViT-Test-8-CL16", "--data", "{folder}"],
        "checkpoint not found",
    ),
    "not_a_ckpt": (
        ["--ckpt", "{tmp}/notes.txt", "--model", "ViT-Test-8-CL16", "--data", "{folder}"],
        "not a torch checkpoint",
    ),
    "wrong_arch": (["--ckpt", "{v1}", "--model", "ViT-Tiny-8-CL32-GAP", "--data", "{folder}"], "does not fit"),
    "no_metadata": (["--ckpt", "{v1}", "--data", "{folder}"], "records no model config"),
    "missing_data": (["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--data", "{tmp}/nodir"], "dataset not found"),
    "class_count": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--data", "{folder}", "--classnames", "{tmp}/two.txt"],
        "has 6 classes but 2 class names",
    ),
    "unknown_model": (["--ckpt", "{v1}", "--model", "ViT-Q-99", "--data", "{folder}"], "unknown model"),
    "random_no_model": (["--random-init", "--data", "{folder}"], "--random-init needs --model"),
    "bad_templates": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--data", "{folder}", "--templates", "{tmp}/notes.txt"],
        "exactly one '{}' placeholder",
    ),
    "batch_size": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--data", "{folder}", "--batch-size", "0"],
        "--batch-size must be >= 1, got 0",
    ),
    "bad_std": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--data", "{folder}", "--image-std", "1", "0", "1"],
        "image std must be positive",
    ),
    # argparse's own errors used to print the 12-line usage block first
    "no_source": (
        ["--ckpt", "{v1}"],
        "give a classification set (--imagenet-val DIR or --data DIR), --retrieval DATA, or both",
    ),
    "missing_retrieval": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--retrieval", "{tmp}/nodir"],
        "no such file",
    ),
    "bad_captions": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--retrieval", "{tmp}/notes.txt"],
        "notes.txt holds no captions",
    ),
    "bad_precision": (["--ckpt", "{v1}", "--data", "{folder}", "--precision", "fp16"], "invalid choice: 'fp16'"),
    # --out is checked before the evaluation, not when the JSON is written at its end
    "out_under_a_file": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--data", "{folder}", "--out", "{tmp}/notes.txt/r.json"],
        "notes.txt is a file, not a directory",
    ),
    "out_is_a_directory": (
        ["--ckpt", "{v1}", "--model", "ViT-Test-8-CL16", "--data", "{folder}", "--out", "{tmp}"],
        "is a directory",
    ),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_are_one_line(case, folder, v1_ckpt, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("this is not a checkpoint\n")
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    args, expect = CLI_ERRORS[case]
    args = [a.format(tmp=tmp_path, folder=folder, v1=v1_ckpt) for a in args]
    assert _run_cli(args) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and out.err.count("\n") == 1 and not out.out, out.err
    assert expect in out.err, out.err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_an_unwritable_out_is_refused_before_any_work(folder, tmp_path, monkeypatch, capsys):
    """--out in a read-only directory (or below one, not there yet): one line, exit 2, before the
    model is built or an image read; a new directory below a writable one is fine."""
    monkeypatch.setattr(Z, "create_model", lambda *a, **k: pytest.fail("built a model"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for out in (ro / "r.json", ro / "new" / "r.json"):
            assert _run_cli(["--random-init", "--model", "ViT-Test-8-CL16", "--data", folder, "--out", out]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: --out ") and "not writable" in err and err.count("\n") == 1, err
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_cli_random_init_for_timing(folder, tmp_path):
    out = tmp_path / "t.json"
    assert (
        _run_cli(
            [
                "--random-init",
                "--model",
                "ViT-Test-8-CL16",
                "--data",
                folder,
                "--classnames",
                _names_file(tmp_path),
                "--templates",
                "short",
                "--out",
                out,
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["checkpoint"] == "random-init" and res["n"] == 24 and res["images_per_second"] > 0


def _process(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval_zeroshot.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=env(),
    )


@pytest.mark.slow
def test_cli_process_exit_code_and_no_traceback(tmp_path):
    r = _process("--ckpt", tmp_path / "missing.safetensors", "--imagenet-val", tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'missing.safetensors'}"]
    r = _process()  # argparse printed a 12-line usage block here
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: one of the arguments --ckpt --random-init is required")


def test_cli_keeps_the_traceback_of_unexpected_errors(folder, tmp_path, monkeypatch):
    """Only input validation is a one-line error: a failure inside the evaluation is not hidden."""

    def broken(*args, **kwargs):
        raise KeyError("visual.proj")

    monkeypatch.setattr(Z, "evaluate", broken)
    with pytest.raises(KeyError, match="visual.proj"):
        _run_cli(
            [
                "--random-init",
                "--model",
                "ViT-Test-8-CL16",
                "--data",
                folder,
                "--classnames",
                _names_file(tmp_path),
                "--out",
                tmp_path / "r.json",
            ]
        )


# ----------------------------------------------------------------------------- retrieval

RECALLS = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]


@pytest.fixture(scope="module")
def captioned_sets(tmp_path_factory):
    """30 coloured-shape images with 1-3 captions each, in every retrieval layout (tests/captioned.py);
    the plain shards hold one undecodable image more."""
    return captioned.write_layouts(str(tmp_path_factory.mktemp("ret")), captioned.make_pairs(30, seed=4))


def _recall_by_hand(image_feats, text_feats, text_image):
    """Rank lists in plain Python: R@k image->text = share of images with one of their captions among
    the k best-scoring captions; text->image = share of captions whose image is among the k best."""
    s = (image_feats @ text_feats.T).tolist()
    n, t = len(s), len(s[0])
    out = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(n):
            best = sorted(range(t), key=lambda j: -s[i][j])[:k]
            hits += any(text_image[j] == i for j in best)
        out[f"image_to_text_R@{k}"] = hits / n
        hits = 0
        for j in range(t):
            best = sorted(range(n), key=lambda i: -s[i][j])[:k]
            hits += text_image[j] in best
        out[f"text_to_image_R@{k}"] = hits / t
    return out


def test_retrieval_recall_by_hand_and_the_same_in_every_layout(captioned_sets, cpu):
    torch.manual_seed(8)
    net = _perturb(factory.create_model("ViT-Test-8-CL32-GAP-BigVision"), 8).eval()
    pairs = captioned.make_pairs(30, seed=4)
    pre = Z.Preprocess.for_model(net.cfg)
    with torch.no_grad():
        x = transforms.normalize(
            torch.stack([pre.transform()(png) for png, _, _ in pairs]), pre.image_mean, pre.image_std
        )
        img = F.normalize(net.encode_image(x), dim=-1)
        caps = [c for _, _, cs in pairs for c in cs]
        txt = F.normalize(net.encode_text(factory.get_tokenizer(net.cfg, reduction="truncate")(caps)), dim=-1)
    text_image = [i for i, (_, _, cs) in enumerate(pairs) for _ in cs]
    expect = _recall_by_hand(img, txt, text_image)
    assert 0 < expect["text_to_image_R@1"] < expect["text_to_image_R@10"] < 1  # not degenerate
    for layout in ("cb_ret", "flickr", "coco", "shards"):
        res = Z.evaluate_retrieval(net, net.cfg, captioned_sets[layout], runtime=cpu, batch_size=7, num_workers=0)
        for k in RECALLS:
            assert res[k] == pytest.approx(expect[k], abs=1e-12), (layout, k)
        assert (res["images"], res["texts"]) == (30, len(caps)), layout
        assert res["skipped"] == (1 if layout == "shards" else 0), layout
        assert res["context_length"] == 32 and res["precision"] == "fp32"
    # recall_at_k itself, on features whose ranking is known
    e = torch.eye(3)
    r = Z.recall_at_k(e, torch.stack([e[0], e[2], e[1], e[1]]), torch.tensor([0, 1, 2, 2]))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3) and r["text_to_image_R@1"] == pytest.approx(1 / 4)


def test_retrieval_cli_writes_both_tasks_to_the_json(folder, captioned_sets, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        _run_cli(
            [
                "--random-init",
                "--model",
                "ViT-Test-8-CL16",
                "--data",
                folder,
                "--classnames",
                _names_file(tmp_path),
                "--templates",
                "short",
                "--retrieval",
                captioned_sets["shards"],
                "--batch-size",
                "8",
                "--out",
                out,
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n"] == 24 and res["skipped"] == 0 and res["nonfinite_weights"] == 0
    r = res["retrieval"]
    assert r["images"] == 30 and r["skipped"] == 1 and r["layout"] == "shards"
    assert r["dataset"] == os.path.abspath(captioned_sets["shards"]) and set(RECALLS) <= set(r)
    printed = capsys.readouterr().out
    assert "top-1 " in printed and "retrieval: image->text R@1 " in printed and "1 unreadable skipped" in printed
    # retrieval alone, default output name next to the checkpoint
    ckpt = tmp_path / "w.safetensors"
    net = factory.create_model("ViT-Test-8-CL16")
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(ckpt), metadata=factory.weights_metadata("ViT-Test-8-CL16", net.cfg))
    assert _run_cli(["--ckpt", ckpt, "--retrieval", captioned_sets["flickr"]]) == 0
    res = json.loads((tmp_path / "w.retrieval_flickr30k.json").read_text())
    assert "top1" not in res and res["retrieval"]["layout"] == "flickr" and res["retrieval"]["texts"] > 30


def test_nonfinite_weights_are_one_warning_line_and_in_the_json(folder, tmp_path, capsys):
    net = factory.create_model("ViT-Test-8-CL16")
    sd = net.state_dict()
    sd["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(ckpt), metadata=factory.weights_metadata("ViT-Test-8-CL16", net.cfg))
    assert (
        _run_cli(
            [
                "--ckpt",
                ckpt,
                "--data",
                folder,
                "--classnames",
                _names_file(tmp_path),
                "--templates",
                "short",
                "--out",
                tmp_path / "r.json",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warn) == 1 and "non-finite weights (NaN/Inf) in 1 tensors: visual.conv1.weight" in warn[0]
    assert json.loads((tmp_path / "r.json").read_text())["nonfinite_weights"] == 1


def test_eval_json_counts_undecodable_images(tmp_path, capsys):
    root = tmp_path / "val"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 10, 10)).save(root / c / "ok.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    assert (
        _run_cli(
            [
                "--random-init",
                "--model",
                "ViT-Test-8-CL16",
                "--data",
                root,
                "--templates",
                "short",
                "--out",
                tmp_path / "r.json",
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n"] == 2 and res["skipped"] == 1
    assert "1 unreadable images skipped" in capsys.readouterr().out


def test_retrieval_on_xla_matches_cpu_with_static_shapes(captioned_sets, cpu):
    import torch_xla.debug.metrics as met

    torch.manual_seed(9)
    net = _perturb(factory.create_model("ViT-Test-8-CL16"), 9)
    kw = dict(batch_size=8, text_batch_size=16, num_workers=0)
    on_cpu = Z.evaluate_retrieval(net, net.cfg, captioned_sets["cb_ret"], runtime=cpu, **kw)
    xla_rt = xla_utils.init_runtime("xla")
    compiles = lambda: (met.metric_data("CompileTime") or [0])[0]  # noqa: E731
    before = compiles()
    xla = Z.evaluate_retrieval(net.to(xla_rt.device), net.cfg, captioned_sets["cb_ret"], runtime=xla_rt, **kw)
    assert compiles() - before <= 3  # 4 image batches (last padded), text chunks (last padded)
    for k in RECALLS:
        assert xla[k] == on_cpu[k], k
