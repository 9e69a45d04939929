"""`python data.py reshard`: shards written by the real writers (webdataset's TarWriter, TensorFlow's
TFRecordWriter) come back in their own format with every non-image field the same bytes, good
images bounded, bad samples and a truncated tail copied as they were, so the loader reads the same
samples and skips the same bad ones; a killed run resumes; bad invocations are one line."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import webdataset as wds
from captioned import image_bytes
from PIL import Image
from runs import env

import data
import shards
import xla_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 64  # --max-side of the tests


GOOD = 6  # per shard: 300x200 JPEGs over N, then the odd ones below


def _samples(shard: int) -> list[dict]:
    out = [
        {
            "__key__": f"s{shard}/{i:04d}",
            "jpg": image_bytes(100 * shard + i, (300, 200)),
            "txt": f"caption {i} of shard {shard}",
            "cls": i % 3,
            "json": {"key": f"{shard}-{i}", "width": 300, "similarity": 0.25 + i / 100},
        }
        for i in range(GOOD)
    ]
    out += [
        {"__key__": f"s{shard}/small", "jpg": image_bytes(7, (40, 30)), "txt": "already small", "cls": 1},
        {"__key__": f"s{shard}/gray-é", "jpg": image_bytes(8, (120, 90), mode="L"), "txt": "grey, non-ASCII key"},
        {"__key__": f"s{shard}/png", "png": image_bytes(9, (100, 50), "PNG", "RGBA"), "txt": "a png"},
        {"__key__": f"s{shard}/bad", "jpg": b"\xff\xd8 not a jpeg at all", "txt": "a bad image"},
        {"__key__": f"s{shard}/nocap", "jpg": image_bytes(10, (200, 200)), "json": {"no": "caption"}},
    ]
    return out


def _tar(path, samples):
    with wds.TarWriter(str(path)) as w:  # pax headers (float mtimes, non-ASCII paths)
        for s in samples:
            w.write(s)


def _example(tf, feats: dict) -> bytes:
    def feature(v):
        if isinstance(v, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
        if isinstance(v, float):
            return tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    return tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in feats.items()})
    ).SerializeToString()


def _tfrecord(path, samples):
    tf = xla_utils.import_tensorflow()
    with tf.io.TFRecordWriter(str(path)) as w:
        for s in samples:
            img = s.get("jpg", s.get("png"))
            feats = {
                "jpg": img,
                "key": s["__key__"].encode(),
                "label": s.get("cls", -1),
                "similarity": 0.5,
                "json": json.dumps(s.get("json", {})).encode(),
            }
            if "txt" in s:
                feats["txt"] = s["txt"].encode()
            w.write(_example(tf, feats))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """wds/: two TarWriter shards, the second cut inside its last sample; tfrecord/: the same
    samples through TFRecordWriter with extra int64 / float / bytes features, the second cut too."""
    root = tmp_path_factory.mktemp("reshard_src")
    for fmt in ("wds", "tfrecord"):
        (root / fmt).mkdir()
        for s in range(2):
            path = root / fmt / f"{s:05d}.{'tar' if fmt == 'wds' else 'tfrecord'}"
            (_tar if fmt == "wds" else _tfrecord)(path, _samples(s))
        cut = root / fmt / f"00001.{'tar' if fmt == 'wds' else 'tfrecord'}"
        raw = cut.read_bytes()
        if fmt == "wds":  # inside the image of the last sample (s1/nocap)
            with tarfile.open(cut) as t:
                at = next(m.offset_data for m in t.getmembers() if m.name == "s1/nocap.jpg") + 100
        else:
            at = len(raw) - 500
        cut.write_bytes(raw[:at])
    return root


def _reshard(capsys, *args) -> tuple[int, dict | None, str]:
    code = data.main(["reshard", *map(str, args)])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if out.strip() else None), err


@pytest.fixture(autouse=True)
def _keep_tf_import_order(monkeypatch):
    monkeypatch.setattr(xla_utils, "TF_AFTER_XLA", xla_utils.TF_AFTER_XLA)  # data.main clears it


def _members(path) -> list[tuple]:
    with tarfile.open(path) as t:
        return [(m.name, m.mtime, m.mode, m.uname, m.pax_headers, t.extractfile(m).read()) for m in t.getmembers()]


def test_tar_round_trip_keeps_every_field_and_bounds_the_images(sources, tmp_path, capsys):
    src = sources / "wds"
    code, summary, err = _reshard(capsys, src, tmp_path / "out", "--max-side", N, "--workers", 2)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == [".lock", ".reshard.json", "00000.tar", "00001.tar"]
    assert (summary["written"], summary["failed"], summary["images_resized"]) == (2, 0, 2 * (GOOD + 2))
    assert summary["bytes_after"] < summary["bytes_before"] == sum(os.path.getsize(p) for p in src.iterdir())
    whole = _members(tmp_path / "out" / "00000.tar")
    assert [m[:5] for m in whole] == [m[:5] for m in _members(src / "00000.tar")]  # names, headers
    changed = 0
    for (name, *_, a), (_, *_, b) in zip(_members(src / "00000.tar"), whole):
        if name.endswith((".jpg", ".png")) and not name.startswith(("s0/bad", "s0/nocap")) and a != b:
            img = Image.open(io.BytesIO(b))
            img.load()
            assert max(img.size) == N and img.format == Image.open(io.BytesIO(a)).format
            changed += 1
        else:
            assert a == b, name  # captions, json, cls, the small and the bad samples
    assert changed == GOOD + 2  # the small one (40x30) is copied unchanged
    # the cut shard: read by webdataset as far as it goes, and its tail is the source's bytes
    cut, new = (src / "00001.tar").read_bytes(), (tmp_path / "out" / "00001.tar").read_bytes()
    assert new.endswith(cut[-2000:]) and len(new) < len(cut)
    # the loader: the same samples, the same skips
    before, after = data.dataset_stats(str(src)), data.dataset_stats(str(tmp_path / "out"))
    assert {k: v for k, v in before.items() if k != "seconds"} == {k: v for k, v in after.items() if k != "seconds"}
    assert before["skipped_by_reason"] == {"bad_image": 2, "missing_caption": 1, "truncated_record": 1}
    loader = data.make_train_loader(str(tmp_path / "out"), None, 32, 4, num_workers=0, repeat=False)
    caps = [c for _, cs in loader for c in cs]
    assert len(caps) == before["samples"] // 4 * 4 and "caption 0 of shard 0" in caps
    assert {s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False)} == {
        s["__key__"] for s in _samples(0)
    }


def test_tfrecord_round_trip_keeps_every_feature(sources, tmp_path, capsys):
    tf = xla_utils.import_tensorflow()
    src = sources / "tfrecord"
    code, summary, err = _reshard(capsys, src, tmp_path / "out", "--max-side", N, "--workers", 1)
    assert code == 0, err
    assert summary["format"] == "tfrecord" and summary["written"] == 2
    out = tmp_path / "out" / "00000.tfrecord"
    recs = lambda p: [tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(str(p)).as_numpy_iterator()]  # noqa: E731
    a, b = recs(src / "00000.tfrecord"), recs(out)
    assert len(a) == len(b) == len(_samples(0))
    resized = 0
    for x, y in zip(a, b):
        fx, fy = dict(x.features.feature), dict(y.features.feature)
        assert fx.keys() == fy.keys() and all(fx[k] == fy[k] for k in fx if k != "jpg")
        old, new = fx["jpg"].bytes_list.value[0], fy["jpg"].bytes_list.value[0]
        if old != new:
            assert max(Image.open(io.BytesIO(new)).size) == N
            resized += 1
        else:
            assert fx["key"].bytes_list.value[0].endswith((b"small", b"bad", b"nocap"))
    assert resized == GOOD + 2  # the grey one and the png too (stored under jpg here)
    cut, new = (src / "00001.tfrecord").read_bytes(), (tmp_path / "out" / "00001.tfrecord").read_bytes()
    assert new.endswith(cut[-300:])  # the truncated last record, copied as it is
    before, after = data.dataset_stats(str(src)), data.dataset_stats(str(tmp_path / "out"))
    assert before["skipped_by_reason"] == after["skipped_by_reason"] and before["samples"] == after["samples"]
    assert before["skipped_by_reason"]["truncated_record"] == 1


def test_resume_skips_finished_shards_and_removes_stale_temporaries(sources, tmp_path, capsys):
    dst = tmp_path / "out"
    assert _reshard(capsys, sources / "wds", dst, "--max-side", N, "--workers", 1)[0] == 0
    done = (dst / "00000.tar").stat()
    os.remove(dst / "00001.tar")  # killed while writing it:
    (dst / ".00001.tar.tmp4242").write_bytes(b"half a shard")
    code, summary, err = _reshard(capsys, sources / "wds", dst, "--max-side", N, "--workers", 1)
    assert code == 0, err
    assert (summary["already_done"], summary["written"]) == (1, 1)
    assert not (dst / ".00001.tar.tmp4242").exists()
    assert (dst / "00000.tar").stat().st_mtime_ns == done.st_mtime_ns
    shards.verify_reshard(
        str(sources / "wds" / "00001.tar"), str(dst / "00001.tar"), shards.resolve(str(sources / "wds")), N
    )
    code, summary, _ = _reshard(capsys, sources / "wds", dst, "--max-side", N)
    assert (code, summary["already_done"], summary["written"]) == (0, 2, 0)
    code, _, err = _reshard(capsys, sources / "wds", dst, "--max-side", 2 * N)
    assert code == 2 and err.count("\n") == 1 and '"max_side": 64' in err


def test_unreadable_shard_fails_alone_and_an_empty_one_is_copied(sources, tmp_path, capsys, caplog):
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(sources / "wds" / "00000.tar", d / "a.tar")
    (d / "b.tar").mkdir()  # listed, but cannot be read
    (d / "c.tar").write_bytes(b"")  # img2dataset: all downloads failed
    code, summary, _ = _reshard(capsys, f"{d}/*.tar", tmp_path / "o", "--max-side", N)
    assert code == 1 and (summary["written"], summary["failed"]) == (2, 1)
    assert summary["failed_shards"][0] == f"{d}/b.tar: OSError: {d}/b.tar: not a regular file"
    assert f"b.tar not resharded: OSError: {d}/b.tar: not a regular file" in caplog.text
    assert sorted(os.listdir(tmp_path / "o")) == [".lock", ".reshard.json", "a.tar", "c.tar"]
    assert (tmp_path / "o" / "c.tar").read_bytes() == b""
    (d / "b.tar").rmdir()
    shutil.copy(sources / "wds" / "00000.tar", d / "b.tar")
    code, summary, _ = _reshard(capsys, f"{d}/*.tar", tmp_path / "o", "--max-side", N)
    assert (code, summary["already_done"], summary["written"]) == (0, 2, 1)  # the rerun retries it


def test_verify_finds_a_changed_caption_and_an_unbounded_image(sources, tmp_path):
    src = shards.resolve(str(sources / "wds"))
    samples = _samples(0)
    samples[2]["txt"] = "another caption"
    _tar(tmp_path / "a.tar", samples)
    with pytest.raises(RuntimeError, match="record 2"):
        shards.verify_reshard(str(sources / "wds" / "00000.tar"), str(tmp_path / "a.tar"), src, N)
    samples = _samples(0)
    samples[1]["jpg"] = image_bytes(0, (90, 60))
    _tar(tmp_path / "b.tar", samples)
    with pytest.raises(RuntimeError, match="over 64"):
        shards.verify_reshard(str(sources / "wds" / "00000.tar"), str(tmp_path / "b.tar"), src, N)


def test_bound_image_geometry_and_formats():
    src = image_bytes(3, (300, 200))
    new, what = shards.bound_image(src, 64, quality=95)
    img = Image.open(io.BytesIO(new))
    assert what == "resized" and img.size == (64, 43) and img.format == "JPEG" and img.mode == "RGB"
    # the whole image, antialiased: what a full decode + Pillow's bicubic downscale gives
    ref = np.asarray(Image.open(io.BytesIO(src)).convert("RGB").resize((64, 43), Image.BICUBIC), np.float32)
    assert np.abs(np.asarray(img.convert("RGB"), np.float32) - ref).mean() < 3
    assert shards.bound_image(src, 300) == (None, "within")
    assert shards.bound_image(src, 64, max_pixels=300 * 199) == (None, "kept")
    assert shards.bound_image(b"\xff\xd8 junk", 64) == (None, "kept")
    gray, _ = shards.bound_image(image_bytes(4, (90, 120), mode="L"), 60)
    assert Image.open(io.BytesIO(gray)).mode == "L" and Image.open(io.BytesIO(gray)).size == (45, 60)
    png, _ = shards.bound_image(image_bytes(5, (200, 100), "PNG", "RGBA"), 50)
    assert (Image.open(io.BytesIO(png)).format, Image.open(io.BytesIO(png)).size) == ("PNG", (50, 25))


@pytest.mark.slow
def test_cli_end_to_end_with_progress_on_stderr(sources, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "data.py"),
            "reshard",
            str(sources / "wds" / "00000.tar"),
            str(tmp_path / "o"),
            "--max-side",
            "48",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["shards"], summary["samples"], summary["images_resized"]) == (1, len(_samples(0)), GOOD + 2)
    assert (summary["bad_samples"], summary["images_kept"], summary["images_within"]) == (1, 1, 1)
    assert "1/1" in r.stderr and "MB" in r.stderr


def _forks(pid: int) -> list[int]:
    """Ids of the live processes that `pid` forked (its children with its command line, from /proc)."""

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = read(f"/proc/{d}/stat").rsplit(b")", 1)[1].split()
            if (
                int(fields[1]) == pid
                and fields[0] != b"Z"
                and read(f"/proc/{d}/cmdline") == read(f"/proc/{pid}/cmdline")
            ):
                kids.append(int(d))
        except OSError:
            continue
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.slow
def test_killed_reshard_takes_its_workers_with_it(tmp_path):
    """SIGKILL of `reshard --workers 2` (OOM killer, preemption): its pool workers end with it, instead
    of writing more shards into DST without its lock and then waiting forever."""
    src = tmp_path / "src"
    src.mkdir()
    for s in range(12):
        _tar(
            src / f"{s:05d}.tar",
            [{"__key__": f"{s}_{i}", "jpg": image_bytes(i, (900, 600)), "txt": "x"} for i in range(8)],
        )
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "reshard", str(src), str(tmp_path / "o")]
    log = open(tmp_path / "stderr", "wb")  # noqa: SIM115 - closed in the finally below
    p = subprocess.Popen([*cmd, "--max-side", "32", "--workers", "2"], env=env(), stdout=log, stderr=log)
    workers = []
    try:
        deadline = time.time() + 120
        while len(workers) < 2 and p.poll() is None and time.time() < deadline:
            workers = _forks(p.pid)
            time.sleep(0.01)
        assert len(workers) == 2, (tmp_path / "stderr").read_text()[-2000:]
        p.kill()  # the workers hold shards to write and more in their queue
        p.wait(timeout=60)
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "a reshard worker outlived its killed parent by 10 s"
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        log.close()


@pytest.mark.parametrize(
    "args, msg",
    [
        (["{src}", "{tmp}/o"], "--max-side"),
        (["{src}", "{tmp}/o", "--max-side", "0"], "--max-side"),
        (["{src}", "{tmp}/o", "--max-side", "64", "--quality", "101"], "--quality"),
        (["{src}", "{tmp}/o", "--max-side", "64", "--workers", "0"], "--workers"),
        (["{src}", "{src}", "--max-side", "64"], "source directory"),
        (["{src}", "{tmp}/file", "--max-side", "64"], "is a file"),
        (["{tmp}/nope/{{0..1}}.tar", "{tmp}/o", "--max-side", "64"], "no such file"),
        (["{src}", "gs://bucket/out", "--max-side", "64"], "local directory"),
        (["{src}/00000.tar::{tmp}/copy/00000.tar", "{tmp}/o", "--max-side", "64"], "named '00000.tar'"),
        (["{src}", "{tmp}/foreign", "--max-side", "64"], "not a reshard output"),
    ],
)
def test_bad_invocations_are_one_line(sources, tmp_path, capsys, args, msg):
    (tmp_path / "file").write_text("x")
    (tmp_path / "copy").mkdir()
    shutil.copy(sources / "wds" / "00000.tar", tmp_path / "copy")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "00001.tar").write_bytes(b"")
    try:
        code = data.main(["reshard"] + [a.format(src=sources / "wds", tmp=tmp_path) for a in args])
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not os.path.exists(tmp_path / "o")


def test_bench_compares_original_and_resharded_shards(sources, tmp_path, capsys):
    import bench_data

    assert _reshard(capsys, sources / "wds", tmp_path / "o", "--max-side", N, "--workers", 1)[0] == 0
    rows = bench_data.compare(str(sources / "wds"), str(tmp_path / "o"), sizes=(32, 48), n=8, rounds=1)
    assert [r["image_size"] for r in rows] == [32, 48] and rows[0]["images"] == 8
    assert max(rows[0]["resharded_size"]) <= N < max(rows[0]["source_size"])
    assert all(r["original_images_per_s_per_core"] > 0 and r["resharded_images_per_s_per_core"] > 0 for r in rows)
    diff = bench_data.crop_difference(str(sources / "wds"), str(tmp_path / "o"), sizes=(32,), n=8)
    assert 0 < diff[0]["mean_abs_diff_resharded"] < 8 and diff[0]["mean_abs_diff_full_decode"] < 8
    assert bench_data.main(["crops", str(sources / "wds" / "00000.tar"), str(sources / "wds" / "00001.tar")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
