"""Exported models in CLIP_benchmark (1.6.2, pinned in requirements-test.txt), the tool researchers
report CLIP results with, offline: its own CLI code (`clip_benchmark eval`, run in this process)
loads our export directory through OpenCLIP's 'local-dir:' loaders, and its zero-shot classification
and retrieval numbers must equal eval_zeroshot.py's on the same images.

One v1 (CLIP BPE, causal text, CLS pooling) and one v2 model (WordPiece, bidirectional text, patch
GAP, tanh GELU), each trained here for a few seconds on coloured shapes so that its accuracy is
neither chance nor perfect, saved as our checkpoint, exported with export.py."""

import json
import os
import sys

import captioned
import clip_benchmark.cli as cb_cli
import pytest
import torch
import torch.nn.functional as F

import eval_zeroshot as Z
import export
import factory
import transforms
import xla_utils

# (steps, seed): ~3 / 5 s on one core; top-1 35% / 25% on the 12 held-out classes (chance 8%)
TRAINING = {"ViT-Test-8-CL16": (80, 0), "ViT-Test-8-CL32-GAP-BigVision": (120, 1)}


# one thread: deterministic training, and the 2 CI cores are shared
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    return (
        captioned.make_pairs(360, seed=1),
        captioned.write_layouts(str(root / "eval"), captioned.make_pairs(72, seed=2, size=32)),
    )


def _train(name, pairs, steps=120, seed=0, lr=3e-3):
    """A short contrastive fit (AdamW, batch 60, one random caption per image per step)."""
    torch.manual_seed(seed)
    net = factory.create_model(name)
    cfg = net.cfg
    t = transforms.eval_transform(cfg.vision.image_size, cfg.interpolation, cfg.square_resize_only)
    images = transforms.normalize(torch.stack([t(jpg) for jpg, _, _ in pairs]), cfg.image_mean, cfg.image_std)
    tok = factory.get_tokenizer(cfg, reduction="truncate")
    caps = [c for _, _, c in pairs]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randperm(len(pairs), generator=g)[:60]
        texts = [caps[i][int(torch.randint(len(caps[i]), (1,), generator=g))] for i in idx]
        img, txt, scale = net(images[idx], tok(texts))
        logits = scale * img @ txt.T
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _clip_benchmark(monkeypatch, out_dir, model_dir, datasets, root, task="auto"):
    """`clip_benchmark eval ...` (its CLI entry point, in this process); {dataset: metrics}."""
    argv = [
        "clip_benchmark",
        "eval",
        "--model",
        f"local-dir:{model_dir}",
        "--pretrained",
        "export",
        "--dataset",
        *datasets,
        "--dataset_root",
        root,
        "--task",
        task,
        "--no_amp",
        "--batch_size",
        "16",
        "--num_workers",
        "0",
        "--recall_k",
        "1",
        "5",
        "10",
        "--output",
        os.path.join(out_dir, "{dataset}.json"),
        "--quiet",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    cb_cli.main()
    return {
        d: json.load(open(os.path.join(out_dir, d.replace("wds/", "").replace("/", "_") + ".json")))["metrics"]
        for d in datasets
    }


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")  # CLIP_benchmark's own call
@pytest.mark.parametrize("name", ["ViT-Test-8-CL16", "ViT-Test-8-CL32-GAP-BigVision"])
def test_clip_benchmark_gives_our_numbers(name, sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    train_pairs, p = sets
    steps, seed = TRAINING[name]
    net = _train(name, train_pairs, steps=steps, seed=seed)
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt.safetensors"
    save_file(net.state_dict(), str(ckpt), metadata=factory.weights_metadata(name, net.cfg))
    assert export.main([str(ckpt), "--to", "open_clip", str(tmp_path / "export") + "/"]) == 0

    # ours: the CLI on the ImageFolder + CLIP_benchmark's own retrieval root, fp32
    out = tmp_path / "ours.json"
    assert (
        Z.main(
            [
                "--ckpt",
                str(ckpt),
                "--data",
                p["imagefolder"],
                "--classnames",
                p["classnames"],
                "--templates",
                p["templates"],
                "--retrieval",
                p["cb_ret"],
                "--precision",
                "fp32",
                "--batch-size",
                "16",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ours = json.loads(out.read_text())
    assert 0.2 < ours["top1"] < 1.0, ours["top1"]  # trained: well above chance (1/12), not trivial
    rt = xla_utils.init_runtime("cpu")
    layouts = {
        k: Z.evaluate_retrieval(net, net.cfg, p[k], runtime=rt, batch_size=16, num_workers=0)
        for k in ("flickr", "coco")
    }

    # CLIP_benchmark on the same images: classification (wds), retrieval (wds, flickr30k, mscoco_captions)
    cls = _clip_benchmark(
        monkeypatch, str(tmp_path), tmp_path / "export", ["wds/cls", "flickr30k", "mscoco_captions"], p["cb_root"]
    )
    ret = _clip_benchmark(
        monkeypatch, str(tmp_path), tmp_path / "export", ["wds/ret"], p["cb_root"], task="zeroshot_retrieval"
    )
    capsys.readouterr()
    assert cls["wds/cls"]["acc1"] == pytest.approx(ours["top1"], abs=1e-9)
    assert cls["wds/cls"]["acc5"] == pytest.approx(ours["top5"], abs=1e-9)
    assert cls["wds/cls"]["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], abs=1e-6)
    theirs = {"cb_ret": ret["wds/ret"], "flickr": cls["flickr30k"], "coco": cls["mscoco_captions"]}
    mine = {"cb_ret": ours["retrieval"], **layouts}
    for layout, m in theirs.items():
        for k in (1, 5, 10):  # CLIP_benchmark: "text retrieval" = image -> text, "image retrieval" = text -> image
            assert m[f"text_retrieval_recall@{k}"] == pytest.approx(mine[layout][f"image_to_text_R@{k}"], abs=1e-6)
            assert m[f"image_retrieval_recall@{k}"] == pytest.approx(mine[layout][f"text_to_image_R@{k}"], abs=1e-6)
    assert 0 < ours["retrieval"]["text_to_image_R@10"] < 1 and ours["retrieval"]["images"] == 72
