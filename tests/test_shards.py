"""shards.py's specs and the files it agrees to open: a spec that mixes webdataset tars and TFRecords
(each shard read by its own format, resume exact), FIFOs and devices in a shard list (an unreadable
shard, counted, never a hang), and brace patterns bounded before they are expanded."""

import contextlib
import json
import os
import signal
import time

import pytest
from captioned import image_bytes, write_tfrecord, write_wds

import data
import shards
import xla_utils

PER_SHARD = 6


def _write_wds(path, samples):
    write_wds(path, [{"__key__": key, "jpg": jpg, "txt": cap} for key, jpg, cap in samples])


def _write_tfrecord(path, samples):
    write_tfrecord(path, [{"jpg": jpg, "txt": cap.encode(), "key": key.encode()} for key, jpg, cap in samples])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """5 shards of PER_SHARD samples, tars and TFRecords alternating (a tar first), and the spec that
    joins them with '::'."""
    d = tmp_path_factory.mktemp("mixed")
    paths, keys = [], []
    for s in range(5):
        samples = [(f"{s}{j:03d}", image_bytes(10 * s + j), f"caption {s}{j:03d} here") for j in range(PER_SHARD)]
        keys += [k for k, _, _ in samples]
        path = d / (f"{s}.tar" if s % 2 == 0 else f"{s}.tfrecord")
        (_write_wds if s % 2 == 0 else _write_tfrecord)(path, samples)
        paths.append(str(path))
    return d, paths, keys


class Blocked(Exception):
    """Not an OSError: code that skips unreadable files does not swallow it."""


@contextlib.contextmanager
def _deadline(seconds: int):
    """Blocked raised in the main thread after `seconds`: a blocking open() or read() fails the test
    instead of hanging it."""

    def fire(signum, frame):
        raise Blocked(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _keep_tf_import_order(monkeypatch):
    monkeypatch.setattr(xla_utils, "TF_AFTER_XLA", xla_utils.TF_AFTER_XLA)  # data.main clears it


def _keys(batches):
    return [cap.split()[1] for caps in batches for cap in caps]


# ----------------------------------------------------------------------------- mixed formats


@pytest.mark.parametrize("first", ["tar", "tfrecord"])
def test_a_mixed_spec_reads_each_shard_by_its_own_format(mixed, first):
    d, paths, keys = mixed
    order = paths if first == "tar" else paths[1:] + paths[:1]
    src = shards.resolve("::".join(order))
    assert src.fmt == ("wds" if first == "tar" else "tfrecord")
    raws = [r for p in src.shards for r in shards.read_shard(p, src)]
    assert [r.reason for r in raws] == [None] * len(keys)
    assert sorted(r.text.split()[1] for r in raws) == sorted(keys)
    stats = data.dataset_stats(src)
    assert (stats["samples"], stats["skipped"]) == (len(keys), 0)
    # an explicit --format names what a shard is read as only when its bytes show neither format
    assert [r.reason for r in shards.read_shard(paths[1], shards.resolve(paths[0], "wds"))] == [None] * PER_SHARD


@pytest.mark.parametrize("workers,consumed", [(2, 4), (0, 7)])
def test_a_mixed_spec_resumes_exactly(mixed, workers, consumed):
    """Forked workers meet TFRecords behind a tar (TensorFlow imported in the worker) and a resumed
    loader replays the very batches of an uninterrupted one."""
    _, paths, keys = mixed
    spec = "::".join(paths)
    kw = dict(num_workers=workers, shuffle_buffer=6, seed=5)
    full = [b for _, (_, b) in zip(range(16), data.make_train_loader(spec, None, 32, 4, **kw))]  # crosses epochs
    loader = data.make_train_loader(spec, None, 32, 4, **kw)
    it = iter(loader)
    head = [next(it)[1] for _ in range(consumed)]
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = data.make_train_loader(spec, None, 32, 4, state=state, **kw)
    tail = [b for _, (_, b) in zip(range(16 - consumed), resumed)]
    assert head + tail == full
    epoch0 = data.make_train_loader(spec, None, 32, 1, repeat=False, **kw)
    assert sorted(_keys(b for _, b in epoch0)) == sorted(keys) and not epoch0.skipped


# ----------------------------------------------------------------------------- what is opened


def test_a_fifo_in_the_shard_list_is_an_unreadable_shard_not_a_hang(mixed, tmp_path, capsys):
    _, paths, keys = mixed
    fifo = tmp_path / "stalled.tar"
    os.mkfifo(fifo)  # open() blocks until a writer comes: none will
    os.symlink("/dev/zero", tmp_path / "zeros.tar")  # a device: reading never ends
    spec = f"{fifo}::{tmp_path / 'zeros.tar'}::{paths[0]}"
    with _deadline(20):
        src = shards.resolve(spec)  # detection skips what it may not open
        assert src.fmt == "wds"
        assert [r.reason for r in shards.read_shard(str(fifo), src)] == ["unreadable_shard"]
        assert [r.reason for r in shards.read_shard(str(tmp_path / "zeros.tar"), src)] == ["unreadable_shard"]
        assert [r.reason for r in shards.read_tfrecord(str(fifo), src)] == ["unreadable_shard"]
        stats = data.dataset_stats(src)
        loader = data.make_train_loader(spec, None, 32, 1, num_workers=0, repeat=False)  # the trainer's
        assert len(_keys(b for _, b in loader)) == PER_SHARD
    assert (stats["samples"], stats["skipped_by_reason"]) == (PER_SHARD, {"unreadable_shard": 2})
    assert dict(loader.skipped) == stats["skipped_by_reason"]
    with _deadline(20), pytest.raises(OSError, match="stalled.tar: not a regular file"):
        shards.resolve(str(fifo))  # nothing readable: the first shard's own error
    with _deadline(60):  # reshard: each fails alone, and no temporary file stays behind
        code = data.main(["reshard", spec, str(tmp_path / "o"), "--max-side", "32", "--workers", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert (code, summary["written"], summary["failed"]) == (1, 1, 2)
    assert all("not a regular file" in f for f in summary["failed_shards"])
    assert [n for n in os.listdir(tmp_path / "o") if ".tmp" in n or not n.startswith(".")] == ["0.tar"]


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with _deadline(20):
        for path in (fifo, tmp_path, "/dev/null"):
            with pytest.raises(OSError, match="not a regular file"):
                shards.open_shard(str(path))
    (tmp_path / "ok.tar").write_bytes(b"x" * 10)
    with shards.open_shard(str(tmp_path / "ok.tar")) as f:
        assert f.read() == b"x" * 10


# ----------------------------------------------------------------------------- brace bounds


@pytest.mark.parametrize(
    "pattern",
    [
        "{00000000..99999999}.tar",  # one range of 10^8
        "{0000..9999}{0000..9999}.tar",  # a product of two small ones
        "{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}"
        "{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}{0..1}.tar",  # 2^23
        "{a,{00000000..99999999}}.tar",  # nested
    ],
)
def test_a_brace_pattern_is_bounded_before_it_is_expanded(tmp_path, pattern):
    t0 = time.time()
    with pytest.raises(ValueError, match=r"expands to more than 4,194,304 shard names"):
        shards.expand_spec(str(tmp_path / pattern))
    assert time.time() - t0 < 10


def test_the_brace_bound_is_exact_and_covers_the_whole_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_SHARDS", 100)
    assert len(shards.expand_braces("{000..099}.tar")) == 100
    with pytest.raises(ValueError, match="more than 100"):
        shards.expand_braces("{000..100}.tar")
    assert shards.expand_braces("{a,b{0..98}}") == ["a"] + [f"b{i}" for i in range(99)]  # nested, as bash does
    with pytest.raises(ValueError, match="more than 100"):
        shards.expand_braces("{a,b{0..99}}")
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="more than 100"):
        shards.expand_spec(f"{tmp_path}/a.tar::{tmp_path}/{{00..99}}.tar")


def test_stats_of_a_huge_brace_pattern_is_one_line(tmp_path, capsys):
    code = data.main(["stats", str(tmp_path / "{00000000..99999999}.tar")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "4,194,304" in err, err
