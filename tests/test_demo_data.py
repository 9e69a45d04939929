"""launch/demo_data.py: deterministic, idempotent generation; both shard formats hold the same
samples and data.py reads them; the zero-shot folder tree; captions that reward syntax masking;
the CLI."""

import io
import json
import os

import demo_data
import pytest
import torch
from PIL import Image
from runs import PY, run

import data
import shards
import tokenizer
import transforms

SMALL = dict(n_train=50, n_val=72, shard_size=20, image_size=48)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data.make_demo_dataset(str(tmp_path_factory.mktemp("demo") / "a"), **SMALL)


def test_regeneration_is_byte_identical_and_idempotent(demo, tmp_path):
    root = demo.root
    assert sorted(os.listdir(os.path.join(root, "train", "wds"))) == ["00000.tar", "00001.tar", "00002.tar"]
    other = demo_data.make_demo_dataset(str(tmp_path / "b"), **SMALL)
    for sub in ("train/wds/00001.tar", "train/tfrecord/00002.tfrecord", "val/35_orange_ring/000071.jpg"):
        with open(os.path.join(root, sub), "rb") as f, open(os.path.join(other.root, sub), "rb") as g:
            assert f.read() == g.read(), sub
    # a matching stamp reuses the files; a damaged set is rebuilt; other parameters rebuild
    shard = os.path.join(other.root, "train", "wds", "00000.tar")
    mtime = os.path.getmtime(shard)
    demo_data.make_demo_dataset(other.root, **SMALL)
    assert os.path.getmtime(shard) == mtime
    os.remove(os.path.join(other.root, "train", "wds", "00001.tar"))
    demo_data.make_demo_dataset(other.root, **SMALL)
    assert os.path.exists(os.path.join(other.root, "train", "wds", "00001.tar"))
    again = demo_data.make_demo_dataset(other.root, **{**SMALL, "n_train": 30})
    assert sorted(os.listdir(os.path.join(other.root, "train", "wds"))) == ["00000.tar", "00001.tar"]
    assert again.train_wds.endswith("{00000..00001}.tar")


def test_both_shard_formats_hold_the_same_samples(demo):
    sw, st = shards.resolve(demo.train_wds), shards.resolve(demo.train_tfrecord)
    assert (sw.fmt, st.fmt) == ("wds", "tfrecord")
    rw = [(r.key, r.image, r.text) for p in sw.shards for r in shards.read_shard(p, sw)]
    rt = [(r.key, r.image, r.text) for p in st.shards for r in shards.read_shard(p, st)]
    assert rw == rt and len(rw) == 50
    assert Image.open(io.BytesIO(rw[0][1])).size == (48, 48)
    # the caption describes the drawn sample
    jpg, cap, meta = demo_data.draw_sample(0, 0, 7, 48)
    assert rw[7] == (f"{7:09d}", jpg, cap) and meta["colour"] in cap and meta["shape"] in cap


def test_zero_shot_folder_tree(demo):
    loader, classes = data.make_eval_loader(demo.val_dir, transforms.eval_transform(48), 36, num_workers=0)
    with open(os.path.join(demo.root, "classnames.txt")) as f:
        names = f.read().split("\n")[:-1]
    assert names == demo.classnames and len(names) == 36
    assert [c.split("_", 1)[1].replace("_", " ") for c in classes] == names
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(labels.sort().values, torch.arange(72) // 2)
    with open(os.path.join(demo.root, "templates.txt")) as f:
        assert f.read().split("\n")[:-1] == demo.templates
    assert all(t.format("red star").count("red star") == 1 for t in demo.templates)


def test_captions_reward_syntax_masking():
    """Truncating to 8 tokens loses the colour / shape words; syntax masking keeps them."""
    syn, cut = tokenizer.Tokenizer("clip_bpe", 8, "syntax"), tokenizer.Tokenizer("clip_bpe", 8, "truncate")
    keep = {"syntax": 0, "truncate": 0}
    n = 200
    for i in range(n):
        _, cap, meta = demo_data.draw_sample(0, 0, i, 16)
        want = {cut([meta["colour"]])[0, 1].item(), cut([meta["shape"]])[0, 1].item()}
        keep["syntax"] += want <= set(syn([cap])[0].tolist())
        keep["truncate"] += want <= set(cut([cap])[0].tolist())
    assert keep["syntax"] >= 0.9 * n and keep["truncate"] <= 0.3 * n, keep


@pytest.mark.slow
def test_cli_prints_the_dataset_another_process_writes_the_same_bytes(tmp_path):
    r = run([PY, "launch/demo_data.py", str(tmp_path / "d"), "--n-train", "12", "--n-val", "36", "--image-size", "32"])
    assert r.returncode == 0, r.stderr
    ds = json.loads(r.stdout)
    assert (ds["n_train"], ds["n_val"], ds["root"]) == (12, 36, str(tmp_path / "d"))
    assert data.dataset_stats(ds["train_wds"])["samples"] == 12
    # TFRecord features are a protobuf map: serialised in key order, the same in every process
    here = demo_data.make_demo_dataset(str(tmp_path / "h"), n_train=12, n_val=36, image_size=32)
    for sub in ("train/wds/00000.tar", "train/tfrecord/00000.tfrecord"):
        with open(os.path.join(ds["root"], sub), "rb") as f, open(os.path.join(here.root, sub), "rb") as g:
            assert f.read() == g.read(), sub


def test_cli_rejects_bad_arguments_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for args, msg in [
        ([str(tmp_path / "e"), "--n-train", "0"], "need --n-train >= 1"),
        ([str(tmp_path / "file")], "exists and is not a directory"),
    ]:
        assert demo_data.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "e")
