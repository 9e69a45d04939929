"""Hostile shards: every format (webdataset tar from webdataset's TarWriter and from tarfile,
TFRecord from TensorFlow's TFRecordWriter, TFDS from its own writer) with ~5% planted bad samples
of every kind, read end to end by the real train loader and by `data.py stats`. Both finish, and
both report exactly the planted counts by reason.

What a planted thing counts as (a skip counts once, whether it loses one sample or a shard's rest):
  per sample  truncated JPEG, random bytes -> bad_image; zero-byte image -> empty_image; header
              claiming 60000x60000 (JPEG, PNG) -> image_too_large; no caption -> missing_caption;
              blank or all-NUL caption -> empty_caption; invalid UTF-8 -> bad_caption_encoding;
              a 1 MiB caption without a space -> caption_too_long
  per shard   file cut inside its last sample -> truncated_record (earlier samples kept); tar
              member size 2^62 / 2^80 (GNU base-256) -> oversized_member, TFRecord length 2^62
              with a valid length CRC -> oversized_record (the rest of that shard: nothing
              after such a header can be found); a directory or a dangling symlink where a shard
              should be -> unreadable_shard
  nothing     a 0-byte shard (img2dataset writes one when all its downloads fail: no sample is
              lost; stats reports it under empty_shards), and a PNG stored as .jpg: Pillow reads
              it by its content, so it is a GOOD sample and trains like any other; so are two
              adjacent tar samples with the same key (both kept, as OpenCLIP's webdataset grouping)
chmod 000 is not used for "unreadable": these tests may run as root, which reads such files."""

import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from collections import Counter

import numpy as np
import pytest
from captioned import image_bytes
from PIL import Image

import data
import shards
import transforms
import xla_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_SHARD = 80


# ----------------------------------------------------------------------------- planted bytes


def _png(i: int) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (30, 20), (i % 256, 40, 200)).save(b, "PNG")
    return b.getvalue()


def _huge_jpeg() -> bytes:
    """A small baseline JPEG whose frame header claims 60000x60000 pixels."""
    b = bytearray(image_bytes(7, (32, 24)))
    sof = b.index(b"\xff\xc0")
    b[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(b)


def _huge_png() -> bytes:
    """A small PNG whose IHDR (with a correct CRC) claims 60000x60000 pixels."""
    b = bytearray(_png(7))
    ihdr = b.index(b"IHDR")
    b[ihdr + 4 : ihdr + 12] = struct.pack(">II", 60000, 60000)
    b[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(b[ihdr : ihdr + 17])))
    return bytes(b)


# (key, image or None, caption or None, expected reason)
BAD = [
    ("b_truncjpeg", image_bytes(1, (64, 48))[:300], "cut", "bad_image"),
    ("b_random", np.random.RandomState(5).bytes(700), "noise", "bad_image"),
    ("b_zerobyte", b"", "nothing", "empty_image"),
    ("b_hugejpeg", _huge_jpeg(), "bomb", "image_too_large"),
    ("b_hugepng", _huge_png(), "bomb png", "image_too_large"),
    ("b_nocaption", image_bytes(2, (32, 24)), None, "missing_caption"),
    ("b_emptycaption", image_bytes(3, (32, 24)), " \t ", "empty_caption"),
    ("b_latin1", image_bytes(4, (32, 24)), "caf\xe9 cr\xe8me".encode("latin-1"), "bad_caption_encoding"),
    ("b_nulcaption", image_bytes(5, (32, 24)), b"\0" * 8, "empty_caption"),
    ("b_longcaption", image_bytes(6, (32, 24)), b"x" * (1 << 20), "caption_too_long"),
]
PER_SAMPLE = Counter(r for *_, r in BAD)


def _samples(fmt: str, shard: int, bad=(), extra_good=(), n=PER_SHARD):
    """n good samples with `bad` ones spread among them; (list, good captions)."""
    out = [
        (f"{fmt}{shard}_{j:03d}", image_bytes(shard * 1000 + j, (32, 24)), f"good {fmt} {shard} {j}") for j in range(n)
    ] + list(extra_good)
    for i, b in enumerate(bad):
        out.insert(7 + i * (len(out) // (len(bad) + 1)), b[:3])
    return out, [c for k, _, c in out if not k.startswith("b_")]


def _tar_header(name: str, size_field: bytes) -> bytes:
    """A ustar header with a raw 12-byte size field and a correct checksum (what a hostile
    writer produces: the header passes every integrity check a tar reader has)."""
    h = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT)[:512])
    h[124:136] = size_field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _base256(n: int) -> bytes:
    return b"\x80" + n.to_bytes(11, "big")


def _tarfile_shard(path, samples, tail: bytes = b""):
    """A shard written with tarfile (PAX, its default format); `tail` replaces its end marker."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, img, cap in samples:
            for ext, v in (("jpg", img), ("txt", cap.encode() if isinstance(cap, str) else cap)):
                if v is not None:
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(v)
                    tf.addfile(ti, io.BytesIO(v))
        end = tf.offset
    blob = buf.getvalue()
    path.write_bytes(blob[:end] + tail if tail else blob)


def _tarwriter_shard(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for key, img, cap in samples:
            s = {"__key__": key, "jpg": img}
            if cap is not None:
                s["txt"] = cap
            w.write(s)


def _tfrecords(path, samples, image_key="jpg", text_key="txt"):
    tf = xla_utils.import_tensorflow()
    with tf.io.TFRecordWriter(str(path)) as w:
        for key, img, cap in samples:
            feats = {"key": key.encode(), image_key: img}
            if cap is not None:
                feats[text_key] = cap.encode() if isinstance(cap, str) else cap
            w.write(
                tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feats.items()
                        }
                    )
                ).SerializeToString()
            )


def _cut_tar_inside(path, name: str):
    """Cut a tar file 100 bytes into the data of member `name` (its header starts with it)."""
    blob = path.read_bytes()
    path.write_bytes(blob[: blob.rindex(name.encode() + b"\0") + 512 + 100])


def _cut_tfrecord_end(path):
    """Cut a TFRecord file's last record (a 160x120 JPEG: KBs) 100 bytes short."""
    blob = path.read_bytes()
    path.write_bytes(blob[:-100])


def _unreadable(d, ext: str):
    os.mkdir(d / f"f_directory.{ext}")  # a directory, not a file
    os.symlink(d / "deleted-after-listing", d / f"g_dangling.{ext}")  # a shard gone since listing


# ----------------------------------------------------------------------------- the datasets


@pytest.fixture(scope="module")
def wds_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_wds")
    good = []
    twins = [
        ("twin", image_bytes(11, (32, 24)), "the first twin"),
        ("twin", image_bytes(12, (32, 24)), "the second twin"),
    ]
    s, g = _samples("wds", 0, BAD[:4], extra_good=twins)
    _tarwriter_shard(d / "a.tar", s)
    good += g
    s, g = _samples("wds", 1, BAD[4:], extra_good=[("g_png", _png(1), "good png stored as jpg")])
    _tarfile_shard(
        d / "b.tar",
        s,
        tail=_tar_header("huge.txt", b"%011o\0" % 5)
        + b"huge\n"
        + b"\0" * 507
        + _tar_header("huge.jpg", _base256(2**62))
        + b"\xff" * 4096,
    )
    good += g
    s, g = _samples("wds", 2, extra_good=[("last", image_bytes(9, (160, 120)), "cut off")])
    _tarwriter_shard(d / "c.tar", s)
    _cut_tar_inside(d / "c.tar", "last.jpg")
    good += g[:-1]
    s, g = _samples("wds", 3)
    _tarfile_shard(d / "d.tar", s[:10], tail=_tar_header("x.jpg", _base256(2**80 - 1)) + b"\0" * 1024)
    good += g[:10]
    (d / "e_empty.tar").write_bytes(b"")
    _unreadable(d, "tar")
    want = PER_SAMPLE + Counter(truncated_record=1, oversized_member=2, unreadable_shard=2)
    return str(d / "*.tar"), want, good


@pytest.fixture(scope="module")
def tfrecord_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_tfrecord")
    good = []
    s, g = _samples("tfr", 0, BAD[:4])
    _tfrecords(d / "a.tfrecord", s)
    good += g
    s, g = _samples("tfr", 1, BAD[4:], extra_good=[("g_png", _png(1), "good png stored as jpg")])
    _tfrecords(d / "b.tfrecord", s)
    length = struct.pack("<Q", 2**62)  # a valid length CRC: only the size betrays it
    with open(d / "b.tfrecord", "ab") as f:
        f.write(length + struct.pack("<I", shards._masked_crc32c(length)) + b"\0" * 2048)
    good += g
    s, g = _samples("tfr", 2, extra_good=[("last", image_bytes(9, (160, 120)), "cut off")])
    _tfrecords(d / "c.tfrecord", s)
    _cut_tfrecord_end(d / "c.tfrecord")
    good += g[:-1]
    (d / "e_empty.tfrecord").write_bytes(b"")
    _unreadable(d, "tfrecord")
    want = PER_SAMPLE + Counter(truncated_record=1, oversized_record=1, unreadable_shard=2)
    return str(d / "*.tfrecord"), want, good


@pytest.fixture(scope="module")
def tfds_set(tmp_path_factory):
    """A TFDS dataset written by TFDS (bad images and captions go through its writer as bytes,
    which it stores unchecked); a caption-less record and a cut-off last record are appended to
    its shard, since a TFDS example must have every feature."""
    import tensorflow_datasets as tfds

    root = tmp_path_factory.mktemp("hostile_tfds")
    samples, good = _samples(
        "tfds",
        0,
        [b for b in BAD if b[2] is not None],
        extra_good=[("g_png", _png(1), "good png stored as jpg")],
        n=150,
    )

    class Hostile(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(encoding_format="jpeg"), "text": tfds.features.Text()}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for key, img, cap in samples:
                yield key, {"image": img, "text": cap}

    Hostile.name = "hostile"
    Hostile(data_dir=str(root)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    src = shards.resolve(str(root / "hostile"))
    assert src.fmt == "tfds" and len(src.shards) == 1
    extra = root / "extra.tfrecord"
    _tfrecords(
        extra,
        [("b_nocaption", image_bytes(2, (32, 24)), None), ("last", image_bytes(9, (160, 120)), "cut off")],
        image_key="image",
        text_key="text",
    )
    with open(src.shards[0], "ab") as f:
        f.write(extra.read_bytes())
    _cut_tfrecord_end(pathlib.Path(src.shards[0]))
    want = PER_SAMPLE + Counter(truncated_record=1)
    return str(root / "hostile"), want, good


# ----------------------------------------------------------------------------- loader and stats


def _through_loader(spec, workers: int):
    loader = data.make_train_loader(spec, None, 16, 1, num_workers=workers, shuffle_buffer=16, repeat=False)
    captions = [c for _, caps in loader for c in caps]
    return loader, captions


def _check(spec, want, good, workers, stats):
    loader, captions = _through_loader(spec, workers)
    assert sorted(captions) == sorted(good)
    assert loader.samples == len(good)
    assert loader.skipped == dict(want)
    assert sum(want.values()) / (len(good) + sum(want.values())) == pytest.approx(0.05, abs=0.02)
    assert stats["skipped_by_reason"] == loader.skipped
    assert (stats["samples"], stats["skipped"]) == (loader.samples, sum(loader.skipped.values()))


@pytest.mark.slow
def test_wds_loader_and_stats_cli_count_every_planted_sample(wds_set):
    spec, want, good = wds_set
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "data.py"), "stats", spec], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads(r.stdout)
    assert (stats["format"], stats["empty_shards"]) == ("wds", 1)
    for workers in (0, 2):
        _check(spec, want, good, workers, stats)


@pytest.mark.parametrize("workers", [0, 2])
def test_tfrecord_loader_and_stats_count_every_planted_sample(tfrecord_set, workers, capsys):
    spec, want, good = tfrecord_set
    assert data.main(["stats", spec]) == 0  # the CLI's code path, in this process
    stats = json.loads(capsys.readouterr().out)
    assert (stats["format"], stats["empty_shards"]) == ("tfrecord", 1)
    _check(spec, want, good, workers, stats)


def test_tfds_loader_and_stats_count_every_planted_sample(tfds_set):
    spec, want, good = tfds_set
    stats = data.dataset_stats(spec)
    assert stats["format"] == "tfds"
    _check(spec, want, good, 0, stats)


# ----------------------------------------------------------------------------- the readers alone


def _wds_raws(path):
    return [(r.key, r.reason) for r in shards.read_wds(str(path), shards.Source("wds", [str(path)]))]


@pytest.mark.parametrize("size_field", [_base256(2**62), _base256(2**80 - 1), _base256(65 << 20)])
def test_huge_tar_member_allocates_nothing(tmp_path, size_field):
    """The size field is believed only up to MAX_RECORD_BYTES and the bytes left in the file:
    no allocation of what the header asks for, one skip, the samples before it kept."""
    _tarfile_shard(
        tmp_path / "h.tar",
        [("a", image_bytes(0, (32, 24)), "cap a")],
        tail=_tar_header("b.jpg", size_field) + b"\0" * 20000,
    )
    tracemalloc.start()
    got = _wds_raws(tmp_path / "h.tar")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [("a", None), ("b", "oversized_member")]
    assert peak < 4 << 20


def test_oversized_member_inside_the_file_skips_only_its_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_RECORD_BYTES", 2000)
    _tarfile_shard(
        tmp_path / "o.tar",
        [
            ("a", image_bytes(0, (32, 24)), "cap a"),
            ("b", image_bytes(1, (320, 240)), "cap b"),
            ("c", image_bytes(2, (32, 24)), "cap c"),
        ],
    )
    assert len(image_bytes(1, (320, 240))) > 2000 > len(image_bytes(2, (32, 24)))
    assert _wds_raws(tmp_path / "o.tar") == [("a", None), ("b", "oversized_member"), ("c", None)]


@pytest.mark.parametrize("size_field", [b"\xff" * 12, b"-0000000001\0"])
def test_negative_tar_sizes_are_a_corrupt_shard(tmp_path, size_field):
    """A negative size (base-256 0xff, or an octal -1) would read the whole rest of the file
    as one member (f.read(-1)): it is a corrupt header, one skip for the rest of the shard and
    the sample being read (as for any corrupt header, whose name cannot be trusted)."""
    _tarfile_shard(
        tmp_path / "n.tar",
        [("a", image_bytes(0, (32, 24)), "cap a"), ("b", image_bytes(1, (32, 24)), "cap b")],
        tail=_tar_header("c.jpg", size_field) + b"\0" * 20000,
    )
    assert _wds_raws(tmp_path / "n.tar") == [("a", None), ("b", "corrupt_shard")]


def test_huge_tfrecord_length_is_not_handed_to_tf_data(tmp_path):
    """tf.data allocates a record's length before reading it (2^62: a segfault that kills the
    process); the framing is checked first, so only sound records reach it."""
    _tfrecords(
        tmp_path / "t.tfrecord", [("a", image_bytes(0, (32, 24)), "cap a"), ("b", image_bytes(1, (32, 24)), "cap b")]
    )
    length = struct.pack("<Q", 2**62)
    with open(tmp_path / "t.tfrecord", "ab") as f:
        f.write(length + struct.pack("<I", shards._masked_crc32c(length)) + b"\0" * 100)
    src = shards.Source("tfrecord", [str(tmp_path / "t.tfrecord")])
    got = [(r.key, r.reason) for r in shards.read_tfrecord(src.shards[0], src)]
    assert got == [("a", None), ("b", None), (f"{src.shards[0]}#2", "oversized_record")]


def test_unreadable_remote_shard_is_a_skip_not_an_exception(tmp_path):
    """A file:// URL is read as the local file it names; a missing one is a skip."""
    src = shards.Source("wds", [])
    url = "file://" + str(tmp_path / "gone.tar")
    assert [r.reason for r in shards.read_wds(url, src)] == ["unreadable_shard"]
    _tarfile_shard(tmp_path / "ok.tar", [("a", image_bytes(0, (32, 24)), "cap a")])
    assert [(r.key, r.reason) for r in shards.read_wds("file://" + str(tmp_path / "ok.tar"), src)] == [("a", None)]


# ----------------------------------------------------------------------------- one pixel cap


def test_one_pixel_cap_for_loader_stats_and_eval(tmp_path, monkeypatch):
    """transforms.MAX_IMAGE_PIXELS decides for the train transform (simplejpeg and Pillow paths), the
    eval transform and stats alike: an image over it is image_too_large everywhere."""
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 40 * 30)
    over, under = image_bytes(1, (48, 32)), image_bytes(2, (40, 30))
    _tarwriter_shard(
        tmp_path / "p.tar", [("over", over, "over"), ("overpng", _png_of(over), "over png"), ("under", under, "under")]
    )
    spec = str(tmp_path / "p.tar")
    stats = data.dataset_stats(spec)
    loader, captions = _through_loader(spec, 0)
    assert captions == ["under"]
    assert stats["skipped_by_reason"] == loader.skipped == {"image_too_large": 2}
    for t in (
        transforms.train_transform(16),
        transforms.TrainTransform(16, use_simplejpeg=False),
        transforms.eval_transform(16),
    ):
        with pytest.raises(transforms.ImageTooLarge):
            t(over)
        assert t(under).shape == (3, 16, 16)


def _png_of(jpeg: bytes) -> bytes:
    b = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(b, "PNG")
    return b.getvalue()


# ----------------------------------------------------------------------------- keys, captions, images


def _tar_of(path, members):
    """A tar of (name, bytes) members in this order (tarfile: any names, repeats too)."""
    with tarfile.open(path, "w") as tf:
        for name, blob in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))


def _stats_and_loader(spec):
    """`stats` and the loader (one reader, no shuffle: the shard's order) on the same spec."""
    stats = data.dataset_stats(spec)
    loader = data.make_train_loader(spec, None, 16, 1, num_workers=0, shuffle_buffer=1, repeat=False)
    batches = list(loader)
    assert stats["skipped_by_reason"] == loader.skipped
    assert stats["samples"] == loader.samples == len(batches)
    return stats, loader, batches


def test_adjacent_samples_with_one_key_are_two_samples(tmp_path):
    """A repeated member name starts a new sample (OpenCLIP's webdataset grouping; webdataset's own
    raises "duplicate file name"): none is lost uncounted, and reshard bounds both images."""
    a1, a2, b = image_bytes(1, (96, 72)), image_bytes(2, (96, 72)), image_bytes(3, (96, 72))
    members = [("a.jpg", a1), ("a.txt", b"first a"), ("a.jpg", a2), ("a.txt", b"second a")]
    members += [("b.jpg", b), ("b.txt", b"b"), ("b.txt", b"caption without an image")]
    _tar_of(tmp_path / "dup.tar", members)
    src = shards.Source("wds", [str(tmp_path / "dup.tar")])
    got = [(r.key, r.text, r.reason) for r in shards.read_wds(src.shards[0], src)]
    assert got == [("a", "first a", None), ("a", "second a", None), ("b", "b", None), ("b", None, "missing_image")]
    _, loader, batches = _stats_and_loader(src.shards[0])
    assert [caps[0] for _, caps in batches] == ["first a", "second a", "b"]
    assert loader.skipped == {"missing_image": 1}
    assert data.main(["reshard", src.shards[0], str(tmp_path / "out"), "--max-side", "24", "--workers", "1"]) == 0
    out = list(shards.read_wds(str(tmp_path / "out" / "dup.tar"), src))
    assert [(r.text, r.reason) for r in out] == [(t, r) for _, t, r in got]
    assert [Image.open(io.BytesIO(r.image)).size for r in out[:3]] == [(24, 18)] * 3


def test_a_caption_is_bounded_before_it_is_decoded(tmp_path):
    """A caption over shards.MAX_CAPTION_BYTES is skipped unread as caption_too_long (the tokenizer
    would spend minutes and GBs on a 20 MB one); one at the bound, in any script, is a caption."""
    n = shards.MAX_CAPTION_BYTES
    captions = [b"x" * n, b"x" * (n + 1), ("\u00e9" * (n // 2)).encode(), ("\u00e9" * (n // 2 + 1)).encode()]
    captions += [b"a cat \0\0", b"\0\0\0\0", b"\0\n\t\x7f \x1b"]
    _tar_of(
        tmp_path / "c.tar",
        [(f"{i}.{ext}", v) for i, c in enumerate(captions) for ext, v in (("jpg", _png(i)), ("txt", c))],
    )
    src = shards.Source("wds", [str(tmp_path / "c.tar")])
    reasons = [r.reason for r in shards.read_wds(src.shards[0], src)]
    assert reasons == [None, "caption_too_long", None, "caption_too_long", None, "empty_caption", "empty_caption"]
    assert shards._make_raw("k", {"jpg": _png(0), "txt": "y" * (n + 1)}, src).reason == "caption_too_long"
    stats, loader, _ = _stats_and_loader(src.shards[0])
    assert loader.skipped == {"caption_too_long": 2, "empty_caption": 2}


def test_16_bit_grayscale_trains_as_its_levels_in_loader_stats_and_reshard(tmp_path):
    """A 16-bit grayscale PNG decodes to its high bytes (not white) in the loader and `stats`, and
    the reshard pass writes the same levels."""
    b = io.BytesIO()
    Image.fromarray(np.full((150, 200), 100 * 256 + 37, np.uint16)).save(b, "PNG")
    _tar_of(tmp_path / "g.tar", [("g.jpg", b.getvalue()), ("g.txt", b"a grey square")])
    _, _, batches = _stats_and_loader(str(tmp_path / "g.tar"))
    assert batches[0][0].unique().tolist() == [100]
    assert (
        data.main(["reshard", str(tmp_path / "g.tar"), str(tmp_path / "out"), "--max-side", "64", "--workers", "1"])
        == 0
    )
    _, _, batches = _stats_and_loader(str(tmp_path / "out" / "g.tar"))
    assert batches[0][0].unique().tolist() == [100]


def _html_first(path, n_bad: int, n_good: int):
    """A web crawl's shard: n_bad HTML error pages saved as .jpg, then n_good images."""
    page = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    recs = [(f"p{i:04d}", page) for i in range(n_bad)] + [(f"q{i:04d}", _png(i)) for i in range(n_good)]
    _tar_of(path, [(f"{k}.{ext}", v) for k, img in recs for ext, v in (("jpg", img), ("txt", k.encode()))])


def test_a_run_of_bad_records_is_skipped_not_fatal(tmp_path):
    """60 undecodable records before the first good one (the loader used to stop at 50): skipped and
    counted, in the loader and in `stats` alike, and no alarm."""
    _html_first(tmp_path / "h.tar", 60, 20)
    stats, loader, batches = _stats_and_loader(str(tmp_path / "h.tar"))
    assert len(batches) == 20 and loader.skipped == {"bad_image": 60}
    assert stats["alarm"] is None


def test_the_bad_share_alarm_is_the_same_in_loader_and_stats(tmp_path, monkeypatch):
    """The alarm looks at windows of data.ALARM_WINDOW consecutive records: at data.ALARM_SHARE bad
    or more, the loader stops (naming the reasons) and `stats` reports the same line."""
    _html_first(tmp_path / "h.tar", 60, 20)
    spec = str(tmp_path / "h.tar")
    monkeypatch.setattr(data, "ALARM_WINDOW", 80)  # 75% bad: no alarm
    assert data.dataset_stats(spec)["alarm"] is None
    monkeypatch.setattr(data, "ALARM_WINDOW", 40)  # the first 40 records: all bad
    alarm = data.dataset_stats(spec)["alarm"]
    assert alarm.startswith("40 of 40 consecutive records were bad (bad_image: 40)")
    for workers in (0, 1):  # raised in a worker, it reaches the main process as the worker's traceback
        loader = data.make_train_loader(spec, None, 16, 1, num_workers=workers, shuffle_buffer=1, repeat=False)
        with pytest.raises(data.BadDataAlarm) as e:
            list(loader)
        assert data.BadDataAlarm.line_of(e.value).endswith(alarm), workers
