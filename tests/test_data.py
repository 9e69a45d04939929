"""The data path, shards.py and data.py: shards written by the real writers (webdataset TarWriter,
TensorFlow TFRecordWriter, TFDS), corrupted shards with exact skip counts, sharding, determinism,
exact resume, pinned batches, evaluation loaders, and the stats CLI. The transforms are tested in
tests/test_transforms.py."""

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from captioned import image_bytes, write_tfrecord, write_wds
from PIL import Image
from runs import env

import data
import shards
import tokenizer
import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


N_SHARDS, PER_SHARD = 5, 12


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """5 wds shards x 12 samples (img2dataset layout) and the same samples as TFRecord shards."""
    d = tmp_path_factory.mktemp("shards")
    truth = {}
    for s in range(N_SHARDS):
        samples, recs = [], []
        for j in range(PER_SHARD):
            key = f"{s:05d}{j:04d}"
            jpg, cap = image_bytes(s * 100 + j), f"caption {key} of a thing"
            truth[key] = (jpg, cap)
            samples.append({"__key__": key, "jpg": jpg, "txt": cap, "json": json.dumps({"key": key})})
            recs.append({"jpg": jpg, "txt": cap.encode(), "key": key.encode()})
        write_wds(d / f"{s:05d}.tar", samples)
        write_tfrecord(d / f"{s:05d}.tfrecord", recs)
    return d, truth


def _keys(loader):
    return [cap.split()[1] for _, caps in loader for cap in caps]


# ----------------------------------------------------------------------------- readers


def test_wds_reader_matches_webdataset_library(tiny_shards):
    import webdataset as wds

    d, truth = tiny_shards
    spec = str(d / "{00000..00004}.tar")
    src = shards.resolve(spec)
    assert src.fmt == "wds" and len(src.shards) == N_SHARDS
    ours = [r for p in src.shards for r in shards.read_wds(p, src)]
    assert all(r.reason is None for r in ours)
    assert {r.key: (r.image, r.text) for r in ours} == truth
    theirs = [
        (s["__key__"], s["jpg"], s["txt"].decode())
        for s in wds.WebDataset(src.shards, shardshuffle=False, empty_check=False)
    ]
    assert [(r.key, r.image, r.text) for r in ours] == theirs


def test_tfrecord_reader_and_detection_by_content(tiny_shards, tmp_path):
    d, truth = tiny_shards
    src = shards.resolve(str(d / "*.tfrecord"))
    assert src.fmt == "tfrecord"
    got = {r.key: (r.image, r.text) for p in src.shards for r in shards.read_tfrecord(p, src)}
    assert got == truth
    # misleading names: the format comes from the bytes, not from the path
    os.symlink(d / "00000.tfrecord", tmp_path / "laion_imagenet.tar")
    os.symlink(d / "00000.tar", tmp_path / "data.tfrecord")
    assert shards.resolve(str(tmp_path / "laion_imagenet.tar")).fmt == "tfrecord"
    assert shards.resolve(str(tmp_path / "data.tfrecord")).fmt == "wds"
    assert shards.expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
    assert shards.expand_spec(str(d / "00000.tar") + "::" + str(d / "{00003..00004}.tar")) == [
        str(d / f"{i:05d}.tar") for i in (0, 3, 4)
    ]
    assert len(shards.expand_spec(str(d))) == 2 * N_SHARDS  # a directory: its shard files


@pytest.mark.slow
def test_missing_paths_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        shards.resolve(str(tmp_path / "nope-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        shards.resolve(str(tmp_path / "*.tar"))
    (tmp_path / "x.tar").write_bytes(b"hello, not a shard" * 100)
    with pytest.raises(ValueError, match="neither a tar"):
        shards.resolve(str(tmp_path / "x.tar"))
    with pytest.raises(ValueError, match="unknown format"):
        shards.resolve(str(tmp_path / "x.tar"), fmt="parquet")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "data.py"), "stats", str(tmp_path / "none.tar")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: no such file") and r.stderr.count("\n") == 1


def test_stats_cli_reports_a_bad_spec_in_one_line(tmp_path, capsys):
    (tmp_path / "x.tar").write_bytes(b"hello, not a shard" * 100)
    assert data.main(["stats", str(tmp_path / "x.tar")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a tar" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        data.main(["stats", "--format", "parquet", str(tmp_path / "x.tar")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument --format") and err.count("\n") == 1


def test_counts_cli_counts_the_words_of_the_captions(tiny_shards, tmp_path, capsys):
    """`data.py counts`: each caption "caption KEY of a thing" (KEY 9 digits) split as the tokenizer
    splits it (CLIP BPE: one word per digit; WordPiece: the number is one word); the TFRecord copy of
    the shards gives the same file; the file is what frequency masking reads."""
    d, truth = tiny_shards
    n = len(truth)
    out = {}
    for tk, fmt in (("clip_bpe", "tar"), ("clip_bpe", "tfrecord"), ("wordpiece", "tar")):
        out[tk, fmt] = str(tmp_path / f"{tk}_{fmt}.json")
        assert data.main(["counts", str(d / f"*.{fmt}"), "--out", out[tk, fmt], "--tokenizer", tk]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["captions"] == n and summary["shards"] == N_SHARDS and summary["skipped"] == 0
    bpe = tokenizer.read_word_counts(out["clip_bpe", "tar"])
    assert (bpe.tokenizer, bpe.total, bpe.captions) == ("clip_bpe", n * (4 + 9), n)
    assert all(bpe.counts[w] == n for w in ("caption", "of", "a", "thing"))
    assert sum(bpe.counts[str(i)] for i in range(10)) == 9 * n and bpe.counts["0"] >= 6 * n
    assert open(out["clip_bpe", "tfrecord"], "rb").read() == open(out["clip_bpe", "tar"], "rb").read()
    wp = tokenizer.read_word_counts(out["wordpiece", "tar"])
    assert wp.total == 5 * n and all(wp.counts[key] == 1 for key in truth)
    assert set(list(wp.counts)[:4]) == {"caption", "of", "a", "thing"}  # most frequent first
    # --top keeps the most frequent words and the total of all
    assert data.main(["counts", str(d / "*.tar"), "--out", str(tmp_path / "top.json"), "--top", "3"]) == 0
    top = tokenizer.read_word_counts(str(tmp_path / "top.json"))
    assert len(top.counts) == 3 and top.total == bpe.total and json.loads(capsys.readouterr().out)["listed"] == 3
    tok = tokenizer.Tokenizer("clip_bpe", 8, "frequency", word_counts=out["clip_bpe", "tar"])
    assert tok(list(truth.values())[0][1]).shape == (1, 8)


def test_counts_cli_bad_input_is_one_line(tiny_shards, tmp_path, capsys):
    d, _ = tiny_shards
    for args, match in (
        ([str(tmp_path / "none.tar"), "--out", str(tmp_path / "c.json")], "no such file"),
        ([str(d / "*.tar"), "--out", str(tmp_path / "no" / "c.json")], "not a file in an existing directory"),
        ([str(d / "*.tar"), "--out", str(tmp_path)], "not a file in an existing directory"),
        ([str(d / "*.tar"), "--out", str(tmp_path / "c.json"), "--top", "0"], "--top must be"),
    ):
        assert data.main(["counts", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "c.json")


# ----------------------------------------------------------------------------- bad samples


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """Good samples mixed with every kind of bad one; expected counts alongside."""
    d = tmp_path_factory.mktemp("corrupt")
    good = [{"__key__": f"g{i}", "jpg": image_bytes(i), "txt": f"caption g{i}"} for i in range(10)]
    bad = [
        {"__key__": "b_notimage", "jpg": b"<html>404 not found</html>", "txt": "caption bad"},
        {"__key__": "b_truncjpeg", "jpg": image_bytes(99)[:300], "txt": "caption bad"},
        {"__key__": "b_empty", "jpg": image_bytes(98), "txt": "   "},
        {"__key__": "b_latin1", "jpg": image_bytes(97), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "b_nocaption", "jpg": image_bytes(96)},
        {"__key__": "b_noimage", "txt": "caption without image"},
    ]
    samples = (
        good[:5] + bad + good[5:] + [{"__key__": "b_last", "jpg": image_bytes(95, (400, 300)), "txt": "caption x"}]
    )
    write_wds(d / "a.tar", samples)
    blob = (d / "a.tar").read_bytes()
    # cut inside the last sample's jpg member (img2dataset killed mid-write)
    cut = blob.rfind(b"b_last.jpg") + 512 + 2000
    (d / "a.tar").write_bytes(blob[:cut])
    (d / "b.tar").write_bytes(b"")  # img2dataset: all downloads of a shard failed
    write_wds(d / "c.tar", [{"__key__": "c0", "jpg": image_bytes(50), "txt": "caption c0"}])
    raw = bytearray((d / "c.tar").read_bytes())
    raw[700:1400] = os.urandom(700)  # corrupt the second header onwards
    (d / "d.tar").write_bytes(bytes(raw[:512]) + b"\x00" * 100 + b"garbage" * 300)
    expected = {
        "bad_image": 2,
        "empty_caption": 1,
        "bad_caption_encoding": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "truncated_record": 1,
        "corrupt_shard": 1,
        "unreadable_shard": 1,
    }
    spec = [str(d / n) for n in ("a.tar", "b.tar", "c.tar", "d.tar", "missing.tar")]
    return spec, expected, 10 + 1  # 10 good in a.tar + c0


def test_stats_counts_every_bad_sample_exactly(corrupt, capsys):
    spec, expected, n_good = corrupt
    assert data.main(["stats", *spec]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["samples"] == n_good
    assert out["skipped_by_reason"] == expected
    assert out["skipped"] == sum(expected.values()) and out["empty_shards"] == 1


def test_loader_skips_bad_samples_and_counts_them(corrupt):
    spec, expected, n_good = corrupt
    loader = data.make_train_loader(spec, None, 32, 1, fmt="wds", num_workers=0, repeat=False)
    caps = [c for _, caps in loader for c in caps]
    assert sorted(caps) == sorted([f"caption g{i}" for i in range(10)] + ["caption c0"])
    assert loader.samples == n_good
    # the loader reads 0-byte and missing shards as unreadable / empty like stats does
    assert loader.skipped == expected


def test_corrupt_tfrecord_counts(tmp_path):
    recs = [{"jpg": image_bytes(i), "txt": f"caption {i}".encode()} for i in range(6)]
    recs[2] = {"jpg": b"GIF89a nonsense", "txt": b"caption bad"}
    recs[3] = {"jpg": image_bytes(3), "txt": b"\xff\xfe\xfa"}
    recs[4] = {"jpg": image_bytes(4)}
    write_tfrecord(tmp_path / "t.tfrecord", recs)
    blob = (tmp_path / "t.tfrecord").read_bytes()
    (tmp_path / "t.tfrecord").write_bytes(blob[:-50])  # truncated last record
    out = data.dataset_stats(str(tmp_path / "t.tfrecord"))
    assert out["format"] == "tfrecord"
    assert out["samples"] == 2
    assert out["skipped_by_reason"] == {
        "bad_image": 1,
        "bad_caption_encoding": 1,
        "missing_caption": 1,
        "truncated_record": 1,
    }
    # a flipped byte inside record 2: its data fails its CRC; its length was sound, so the records after it are read
    write_tfrecord(tmp_path / "u.tfrecord", [{"jpg": image_bytes(i), "txt": b"caption"} for i in range(5)])
    blob, off = bytearray((tmp_path / "u.tfrecord").read_bytes()), 0
    for _ in range(2):
        off += 16 + int.from_bytes(blob[off : off + 8], "little")
    blob[off + 12 + 40] ^= 0xFF
    (tmp_path / "u.tfrecord").write_bytes(bytes(blob))
    out = data.dataset_stats(str(tmp_path / "u.tfrecord"))
    assert (out["samples"], out["skipped_by_reason"]) == (4, {"corrupt_record": 1})


# ----------------------------------------------------------------------------- sharding / order / resume


@pytest.mark.parametrize("n_shards", [5, 3])  # 5 >= 4 readers: by shard; 3 < 4: by record
def test_sharding_over_ranks_and_workers_no_dup_no_gap(tiny_shards, n_shards):
    d, truth = tiny_shards
    spec = [str(d / f"{s:05d}.tar") for s in range(n_shards)]
    seen = []
    for rank in range(2):
        loader = data.make_train_loader(
            spec, None, 32, 1, num_workers=2, rank=rank, world_size=2, shuffle_buffer=8, repeat=False
        )
        seen.append(_keys(loader))
    allk = seen[0] + seen[1]
    assert len(allk) == len(set(allk)) == n_shards * PER_SHARD
    assert set(seen[0]).isdisjoint(seen[1]) and seen[0] and seen[1]


def test_tfrecord_with_forked_workers(tiny_shards):
    """tf.data inside forked DataLoader workers (TensorFlow imported in the parent first)."""
    d, truth = tiny_shards
    loader = data.make_train_loader(str(d / "*.tfrecord"), None, 32, 1, num_workers=2, repeat=False)
    keys = _keys(loader)
    assert sorted(keys) == sorted(truth) and loader.samples == len(truth)


def test_order_is_deterministic_per_seed_and_epoch(tiny_shards):
    d, _ = tiny_shards
    spec = str(d / "{00000..00004}.tar")

    def order(seed, epoch):
        return _keys(
            data.make_train_loader(
                spec, None, 32, 4, num_workers=0, seed=seed, epoch=epoch, shuffle_buffer=20, repeat=False
            )
        )

    a = order(0, 0)
    assert a == order(0, 0)
    assert sorted(a) == sorted(order(0, 1)) and a != order(0, 1) and a != order(1, 0)
    assert a != sorted(a)  # actually shuffled


def test_images_are_deterministic_and_uint8(tiny_shards):
    d, _ = tiny_shards
    spec = str(d / "{00000..00001}.tar")
    runs = [next(iter(data.make_train_loader(spec, None, 48, 6, num_workers=0, shuffle_buffer=8))) for _ in range(2)]
    assert runs[0][0].dtype == torch.uint8 and runs[0][0].shape == (6, 3, 48, 48)
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("workers,consumed", [(2, 5), (0, 13)])
def test_resume_is_exact(tiny_shards, workers, consumed):
    d, _ = tiny_shards
    spec = str(d / "{00000..00004}.tar")
    kw = dict(num_workers=workers, shuffle_buffer=10, seed=3)
    full = [b for _, (_, b) in zip(range(30), data.make_train_loader(spec, None, 32, 4, **kw))]  # crosses epochs
    loader = data.make_train_loader(spec, None, 32, 4, **kw)
    it = iter(loader)
    head = [next(it)[1] for _ in range(consumed)]
    state = json.loads(json.dumps(loader.state_dict()))  # plain JSON
    resumed = data.make_train_loader(spec, None, 32, 4, state=state, **kw)
    tail = [b for _, (_, b) in zip(range(30 - consumed), resumed)]
    assert head + tail == full
    assert resumed.epoch >= 1 and len(set(k for b in full[:15] for k in b)) == 60  # epoch 0 = 60 samples


class _SeedProbe:
    """A transform that returns the torch seed of the process it runs in (a loader worker)."""

    def __call__(self, src, rng=None):
        return torch.tensor([torch.initial_seed()])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_leaves_the_global_torch_rng_alone(tiny_shards, workers):
    """The trainer restores torch's global RNG on resume and masks images with it: starting the
    loader (its first batch, each epoch) must not draw from it, and its batches must not depend
    on it."""
    d, _ = tiny_shards
    spec = str(d / "{00000..00004}.tar")
    kw = dict(num_workers=workers, shuffle_buffer=10, seed=2)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        batches = [b for _, b in zip(range(20), data.make_train_loader(spec, None, 32, 4, **kw))]  # 2 epochs
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(batches)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(*runs))


def test_resume_keeps_the_mask_stream_exact(tiny_shards):
    """What train.py does in a masked stage: a mask drawn from the global RNG after each batch;
    a resumed run restores that RNG and the loader state and draws the very same masks."""
    d, _ = tiny_shards
    spec = str(d / "{00000..00004}.tar")
    kw = dict(num_workers=2, shuffle_buffer=10, seed=4)
    torch.manual_seed(0)
    loader = data.make_train_loader(spec, None, 32, 4, **kw)
    it = iter(loader)
    masks = []
    for step in range(20):
        next(it)
        masks.append(torch.rand(6))
        if step == 7:
            loader_state, saved = json.loads(json.dumps(loader.state_dict())), torch.get_rng_state()
    torch.manual_seed(99)  # a new process: whatever state, then the restore
    torch.set_rng_state(saved)
    resumed = iter(data.make_train_loader(spec, None, 32, 4, state=loader_state, **kw))
    again = []
    for _ in range(12):
        next(resumed)
        again.append(torch.rand(6))
    assert all(torch.equal(a, b) for a, b in zip(masks[8:], again))


def test_worker_seeds_are_deterministic_per_seed_epoch_and_rank(tiny_shards):
    d, _ = tiny_shards
    src = shards.resolve(str(d / "{00000..00004}.tar"))

    def seeds(seed=0, epoch=0, rank=0, global_seed=0):
        torch.manual_seed(global_seed)
        loader = data.TrainLoader(
            src,
            None,
            _SeedProbe(),
            4,
            num_workers=2,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=2,
            shuffle_buffer=1,
            prefetch=4,
            repeat=False,
            state=None,
            pin_memory=False,
        )
        return {int(s) for images, _ in loader for s in images.flatten()}

    base = seeds()
    assert len(base) == 2  # one per worker
    assert seeds(global_seed=5) == base  # not from torch's global RNG
    assert len({frozenset(base), frozenset(seeds(seed=1)), frozenset(seeds(epoch=1)), frozenset(seeds(rank=1))}) == 4


def test_resume_with_other_layout_skips_finished_shards(tiny_shards):
    d, truth = tiny_shards
    spec = str(d / "{00000..00004}.tar")
    loader = data.make_train_loader(spec, None, 32, 1, num_workers=0, shuffle_buffer=1, repeat=False)
    it = iter(loader)
    head = [next(it)[1][0].split()[1] for _ in range(30)]  # shards 1, 2 finished, 3rd half
    state = loader.state_dict()
    again = _keys(data.make_train_loader(spec, None, 32, 1, num_workers=2, shuffle_buffer=1, repeat=False, state=state))
    assert set(head) | set(again) == set(truth)
    finished = set(head[:24])
    assert finished.isdisjoint(again)  # shard granularity: finished shards not repeated


@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_loader_gives_the_same_batches_and_resumes(tiny_shards, workers):
    """pin_memory copies every DataLoader item (the state travels in it): same batches, same
    state, exact resume; page-locked where an accelerator exists (the CPU client ignores it)."""
    d, _ = tiny_shards
    spec = str(d / "{00000..00004}.tar")
    tok = tokenizer.Tokenizer("clip_bpe", 16)
    kw = dict(num_workers=workers, shuffle_buffer=10, seed=1)
    plain = data.make_train_loader(spec, tok, 32, 4, **kw)
    want = [b for _, b in zip(range(20), plain)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'pin_memory' argument is set as true but no accelerator")
        pinned = data.make_train_loader(spec, tok, 32, 4, pin_memory=True, **kw)
        it = iter(pinned)
        got = [next(it) for _ in range(7)]
        state = json.loads(json.dumps(pinned.state_dict()))
        resumed = data.make_train_loader(spec, tok, 32, 4, pin_memory=True, state=state, **kw)
        got += [b for _, b in zip(range(13), resumed)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))
    assert all(x.is_pinned() == torch.accelerator.is_available() for b in got for x in b)


def test_small_batches_through_the_pipe_equal_those_through_shared_memory(tiny_shards, monkeypatch):
    """Workers hand small batches over as numpy through their pipe (no file-descriptor round trip),
    bigger ones as shared-memory tensors: the trainer gets the same tensors and state either way."""
    d, _ = tiny_shards
    spec = str(d / "{00000..00004}.tar")
    tok = tokenizer.Tokenizer("clip_bpe", 16)

    arrived = []
    unpipe = data._unpipe

    def recording_unpipe(x):
        arrived.append(type(x).__name__)
        return unpipe(x)

    monkeypatch.setattr(data, "_unpipe", recording_unpipe)

    def run():
        arrived.clear()
        loader = data.make_train_loader(spec, tok, 32, 4, num_workers=2, shuffle_buffer=10, seed=3)
        return [b for _, b in zip(range(9), loader)], json.dumps(loader.state_dict()), set(arrived)

    piped, piped_state, piped_types = run()
    monkeypatch.setattr(data, "PIPE_BYTES", 0)  # forked workers see it: every tensor by shared memory
    shared, shared_state, shared_types = run()
    assert piped_types == {"ndarray"} and shared_types == {"Tensor"}
    assert all(type(x) is torch.Tensor and x.is_contiguous() for b in piped for x in b)
    assert [b[0].dtype for b in piped] == [torch.uint8] * 9 and piped[0][1].dtype == torch.long
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(piped, shared))
    assert piped_state == shared_state


KILLED_MID_EPOCH = r"""
import os, signal, sys, time
import data, tokenizer
loader = data.make_train_loader(sys.argv[1], tokenizer.Tokenizer("clip_bpe", 16), 64, 8, num_workers=2,
                                shuffle_buffer=1)
batches = iter(loader)
next(batches)
time.sleep(2)          # the workers fill their pipes with batches nobody will read
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_loader_worker_behind(tiny_shards):
    """SIGKILL (OOM killer, preemption) of the main process: its loader workers go too, even with
    batches stuck in a full pipe, instead of living on and holding its stdout open (a shell pipe or a
    supervisor waiting for the output to end would wait forever)."""
    d, _ = tiny_shards
    p = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_EPOCH, str(d / "{00000..00004}.tar")],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert p.wait(timeout=120) == -9
        deadline, eof = time.time() + 20, False
        while not eof and time.time() < deadline:  # EOF once the last holder of the write end exits
            eof = bool(select.select([p.stdout], [], [], 0.5)[0]) and os.read(p.stdout.fileno(), 1 << 16) == b""
        assert eof, "a loader worker outlived its killed main process by 20 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, 9)  # the workers share the killed process's group


def test_real_tokenizer_in_loader(tiny_shards):
    tok = tokenizer.Tokenizer("clip_bpe", 16)
    d, _ = tiny_shards
    loader = data.make_train_loader(
        str(d / "00000.tfrecord"), tok, 32, 4, num_workers=0, shuffle_buffer=1, repeat=False
    )
    images, tokens = next(iter(loader))
    assert tokens.dtype == torch.long and tokens.shape == (4, 16)
    keys = [f"00000{j:04d}" for j in range(4)]
    assert torch.equal(tokens, tok([f"caption {k} of a thing" for k in keys]))


def test_no_batch_is_a_clear_error(tiny_shards):
    d, _ = tiny_shards
    loader = data.make_train_loader(str(d / "00000.tar"), None, 32, 100, num_workers=0)
    with pytest.raises(ValueError, match="no training batch"):
        next(iter(loader))


# ----------------------------------------------------------------------------- TFDS


def _tfds_dir(root, kind):
    import tensorflow_datasets as tfds

    class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            feats = {"image": tfds.features.Image(encoding_format="jpeg")}
            feats.update(
                {"text": tfds.features.Text()}
                if kind == "train"
                else {"label": tfds.features.ClassLabel(names=["n02", "n01x", "n03"])}
            )
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats))

        def _split_generators(self, dl_manager):
            return {"train" if kind == "train" else "validation": self._generate_examples()}

        def _generate_examples(self):
            for i in range(9):
                img = np.asarray(Image.open(io.BytesIO(image_bytes(i))).convert("RGB"))
                yield (
                    i,
                    ({"image": img, "text": f"caption t{i}"} if kind == "train" else {"image": img, "label": i % 3}),
                )

    Tiny.name = f"tiny_{kind}"
    b = Tiny(data_dir=str(root))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.path.join(str(root), f"tiny_{kind}")


def test_tfds_train_and_eval(tmp_path):
    train_dir = _tfds_dir(tmp_path, "train")
    loader = data.make_train_loader(train_dir, None, 32, 3, num_workers=0, repeat=False)  # detected
    assert loader.src.fmt == "tfds"
    assert sorted(c for _, caps in loader for c in caps) == [f"caption t{i}" for i in range(9)]
    val_dir = _tfds_dir(tmp_path, "val")
    ev, classes = data.make_eval_loader(val_dir, transforms.eval_transform(32), 4, num_workers=0)
    assert classes == ["n02", "n01x", "n03"]  # the dataset's own label order
    labels = torch.cat([y for _, y in ev]).tolist()
    assert sorted(labels) == sorted(i % 3 for i in range(9))


@pytest.mark.slow
def test_img2dataset_output_when_available(tmp_path):
    """Optional: shards written by img2dataset itself from a loopback HTTP server. img2dataset is not
    a project dependency; point CLIPA_IMG2DATASET at its executable (e.g. in a separate venv)."""
    import csv
    import functools
    import http.server
    import threading

    exe = os.environ.get("CLIPA_IMG2DATASET")
    if not exe or not os.path.exists(exe):
        pytest.skip("set CLIPA_IMG2DATASET=/path/to/img2dataset to run")
    www = tmp_path / "www"
    www.mkdir()
    for i in range(8):
        (www / f"{i}.jpg").write_bytes(image_bytes(i, (320, 240)))
    (www / "bad.jpg").write_bytes(b"<html>not an image</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [(f"{url}/{i}.jpg", f"caption {i}") for i in range(8)] + [(f"{url}/bad.jpg", "bad")]
    rows += [(f"{url}/missing{i}.jpg", "gone") for i in range(3)]  # the last shard fails entirely
    with open(tmp_path / "urls.csv", "w", newline="") as f:
        csv.writer(f).writerows([("url", "caption")] + rows)
    try:
        subprocess.run(
            [
                exe,
                "--url_list",
                str(tmp_path / "urls.csv"),
                "--input_format",
                "csv",
                "--url_col",
                "url",
                "--caption_col",
                "caption",
                "--output_format",
                "webdataset",
                "--output_folder",
                str(tmp_path / "out"),
                "--processes_count",
                "1",
                "--thread_count",
                "4",
                "--image_size",
                "128",
                "--number_sample_per_shard",
                "3",
                "--enable_wandb",
                "False",
                "--distributor",
                "multiprocessing",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    finally:
        server.shutdown()
    out = data.dataset_stats(str(tmp_path / "out"))  # the folder also holds parquet/json files
    assert (out["format"], out["samples"], out["skipped"]) == ("wds", 8, 0)
    assert out["empty_shards"] == 1
    loader = data.make_train_loader(str(tmp_path / "out"), None, 32, 1, num_workers=0, repeat=False)
    assert sorted(c for _, caps in loader for c in caps) == sorted(f"caption {i}" for i in range(8))
