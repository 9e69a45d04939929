"""Where CLIPA's records come from: shard specs, format detection and record readers.

Sources (CLIPA_SPEC section 5):
  wds       webdataset tar shards as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json), read by a
            streaming tar parser of our own (exact control over truncated / corrupt records).
  tfrecord  TFRecord shards of tf.train.Example with bytes features `jpg` and `txt`, read with tf.data.
  tfds      a TFDS dataset directory (tfds.builder_from_directory); its TFRecord files are read directly.
The format comes from an explicit flag or from the files' first bytes, never from a path substring.
Readers never raise for bad data: a bad record comes out flagged with the reason (Raw.reason), so
that loaders and `python data.py stats` can count and skip it.
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import xla_utils

log = logging.getLogger("clipa.shards")

FORMATS = ("wds", "tfrecord", "tfds")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image")    # first present wins
TEXT_KEYS = ("txt", "caption", "text")


# ----------------------------------------------------------------------------- local or remote files

def is_remote(path: str) -> bool:
    """gs://, s3://, ... paths: read through TensorFlow's gfile."""
    return "://" in path


def _open(path: str):
    if is_remote(path):
        return xla_utils.import_tensorflow().io.gfile.GFile(path, "rb")
    return open(path, "rb", buffering=1 << 20)


# ----------------------------------------------------------------------------- shard specs

def expand_braces(pattern: str) -> list[str]:
    """`a{000..002}b{x,y}` -> 6 names; numeric ranges keep zero padding (braceexpand semantics)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.startswith("0") or b.startswith("0") else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def _is_shard_name(name: str) -> bool:
    """Shard files in a directory: *.tar, *.tfrecord, TFDS-style *.tfrecord-00000-of-00010."""
    return name.endswith((".tar", ".tfrec", ".record")) or ".tfrecord" in name


def expand_spec(spec: str | Sequence[str]) -> list[str]:
    """Shard list from brace patterns, globs, directories, '::'-joined patterns or a list.
    Raises FileNotFoundError when nothing matches."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    patterns = [p for s in patterns for p in str(s).split("::") if p]
    out: list[str] = []
    for pat in patterns:
        for p in expand_braces(os.path.expanduser(pat)):
            if any(c in p for c in "*?["):
                glob = xla_utils.import_tensorflow().io.gfile.glob if is_remote(p) else globlib.glob
                hits = sorted(glob(p))
                if not hits:
                    raise FileNotFoundError(f"no files match {p!r}")
                out.extend(hits)
            elif not is_remote(p) and os.path.isdir(p) and find_tfds_dir(p) is None:
                hits = sorted(os.path.join(p, f) for f in os.listdir(p) if _is_shard_name(f))
                if not hits:
                    raise FileNotFoundError(f"no .tar/.tfrecord shards in directory {p!r}")
                out.extend(hits)
            else:
                out.append(p)
    if not out:
        raise FileNotFoundError(f"empty data spec {spec!r}")
    local = [p for p in out if not is_remote(p)]
    if local and not any(os.path.exists(p) for p in local):
        raise FileNotFoundError(f"no such file: {local[0]!r}" + (f" (nor the other {len(local) - 1})"
                                                                  if len(local) > 1 else ""))
    return out


def find_tfds_dir(path: str) -> str | None:
    """The TFDS version directory (holding dataset_info.json) at or up to 2 levels below path."""
    if is_remote(path) or not os.path.isdir(path):
        return None
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    found = sorted(globlib.glob(os.path.join(path, "*", "dataset_info.json"))
                   + globlib.glob(os.path.join(path, "*", "*", "dataset_info.json")))
    if not found:
        return None
    # newest version when several (e.g. imagenet2012/5.0.0 and 5.1.0)
    def version(p):
        return [int(x) if x.isdigit() else -1 for x in os.path.basename(os.path.dirname(p)).split(".")]
    return os.path.dirname(max(found, key=version))


# TFRecord framing: uint64 length, masked crc32c(length), data, masked crc32c(data)
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _looks_tar(head: bytes) -> bool:
    if len(head) < 512:
        return False
    if head[257:262] == b"ustar":
        return True
    try:  # v7 tar without magic: verify the header checksum
        stored = int(head[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(head[:148]) + 8 * 32 + sum(head[156:512])


def _looks_tfrecord(head: bytes) -> bool:
    return len(head) >= 12 and struct.unpack("<I", head[8:12])[0] == _masked_crc32c(head[:8])


def detect_format(paths: Sequence[str]) -> str:
    """'wds' | 'tfrecord' | 'tfds' from the files' contents (first bytes), not from their names."""
    for p in paths[:16]:
        if find_tfds_dir(p):
            return "tfds"
        if not is_remote(p) and not os.path.exists(p):
            continue
        try:
            with _open(p) as f:
                head = f.read(512)
        except OSError:
            continue
        if not head:
            continue        # img2dataset writes a 0-byte shard when all its downloads failed
        if _looks_tar(head):
            return "wds"
        if _looks_tfrecord(head):
            return "tfrecord"
        raise ValueError(f"{p}: neither a tar (webdataset) nor a TFRecord file; pass --format")
    raise ValueError(f"cannot detect the format of {paths[0]!r}: no readable non-empty file; "
                     f"pass --format")


@dataclass
class Source:
    """A resolved data spec: format, shard files, and the feature keys to read."""
    fmt: str
    shards: list[str]
    image_keys: tuple = IMAGE_KEYS
    text_keys: tuple = TEXT_KEYS
    label_key: str | None = None
    classes: list[str] | None = None


def resolve(spec, fmt: str | None = None, split: str = "train") -> Source:
    """A data spec (or an already resolved Source, returned as is) -> Source. Raises
    FileNotFoundError / ValueError with a one-line message for a spec that cannot be read."""
    if isinstance(spec, Source):
        return spec
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "tfds" or (fmt is None and isinstance(spec, str) and find_tfds_dir(spec)):
        return _resolve_tfds(spec, split)
    shards = expand_spec(spec)
    fmt = fmt or detect_format(shards)
    if fmt == "tfds":
        return _resolve_tfds(shards[0], split)
    return Source(fmt, shards)


def _resolve_tfds(path, split: str) -> Source:
    path = path if isinstance(path, str) else list(path)[0]
    if not is_remote(path) and not os.path.exists(path):
        raise FileNotFoundError(f"no such TFDS directory: {path!r}")
    d = find_tfds_dir(path) or path
    xla_utils.import_tensorflow()
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder_from_directory(d)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types; report in one line
        raise ValueError(f"{path}: not a TFDS dataset directory ({type(e).__name__}: {e})") from None
    info = builder.info
    if split not in info.splits:
        raise ValueError(f"{d}: no split {split!r} (has {', '.join(info.splits.keys())})")
    fmt_name = str(getattr(info, "file_format", "tfrecord")).lower()
    if "tfrecord" not in fmt_name:
        raise ValueError(f"{d}: TFDS file format {fmt_name} is not supported (tfrecord only)")
    files = [os.fspath(p) for p in info.splits[split].filepaths]
    image_keys, text_keys, label_key, classes = [], [], None, None
    for name, feat in info.features.items():
        if isinstance(feat, tfds.features.Image):
            image_keys.append(name)
        elif isinstance(feat, tfds.features.Text):
            text_keys.append(name)
        elif isinstance(feat, tfds.features.ClassLabel):
            label_key, classes = name, list(feat.names)
    return Source("tfds", files, tuple(image_keys) or IMAGE_KEYS, tuple(text_keys) or TEXT_KEYS,
                  label_key, classes)


# ----------------------------------------------------------------------------- record readers

class Raw(NamedTuple):
    """One record as read from a shard. reason is None for a usable record, else why it is bad."""
    key: str
    image: bytes | None
    text: str | int | None      # caption (train) or class label (eval)
    reason: str | None = None


class _Truncated(Exception):
    pass


def _tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream; stops at the end-of-archive marker.
    Raises _Truncated(name of the member cut short, or None between members) when the file ends
    early, and ValueError on a corrupt header."""
    long_name, first = None, True
    while True:
        hdr = f.read(512)
        if not hdr and first:   # a 0-byte shard (img2dataset: all downloads failed): no samples
            return
        first = False
        if len(hdr) < 512:      # EOF without the end-of-archive marker: the writer was cut off
            raise _Truncated()
        if hdr.count(0) == 512:
            return
        try:
            chk = int(hdr[148:156].strip(b"\0 "), 8)
        except ValueError:
            raise ValueError("corrupt tar header") from None
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:512]):
            raise ValueError("corrupt tar header (checksum)")
        size_field = hdr[124:136]
        if size_field[0] & 0x80:   # GNU base-256 size for members > 8 GiB
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.strip(b"\0 ") or b"0", 8)
        kind = hdr[156:157]
        if long_name is not None:
            name = long_name
        else:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        data = f.read(size)
        if len(data) < size:
            raise _Truncated(name if kind in (b"0", b"\0", b"7") else None)
        f.read((-size) % 512)
        if kind == b"L":           # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":           # pax header: take the path
            for rec in data.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        long_name = None
        if kind not in (b"0", b"\0", b"7"):
            continue
        yield name, data


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _make_raw(key: str, parts: dict, src: Source, truncated: bool = False) -> Raw:
    image = next((parts[k] for k in src.image_keys if k in parts), None)
    if src.label_key is not None:
        if image is None:
            return Raw(key, None, None, "truncated_record" if truncated else "missing_image")
        if src.label_key not in parts:
            return Raw(key, None, None, "truncated_record" if truncated else "missing_label")
        return Raw(key, image, int(parts[src.label_key]))
    text = next((parts[k] for k in src.text_keys if k in parts), None)
    if image is None or text is None:
        if truncated:
            return Raw(key, None, None, "truncated_record")
        return Raw(key, None, None, "missing_image" if image is None else "missing_caption")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return Raw(key, None, None, "bad_caption_encoding")
    text = text.strip()
    if not text:
        return Raw(key, None, None, "empty_caption")
    return Raw(key, image, text)


def read_wds(path: str, src: Source) -> Iterator[Raw]:
    """Samples of one webdataset tar shard, bad ones flagged (never raises for bad data)."""
    try:
        f = _open(path)
    except OSError as e:
        yield Raw(path, None, None, "unreadable_shard")
        log.warning("unreadable shard %s: %s", path, e)
        return
    key, parts = None, {}
    with f:
        try:
            for name, data in _tar_members(f):
                k, ext = _split_key(name)
                if k != key:
                    if key is not None:
                        yield _make_raw(key, parts, src)
                    key, parts = k, {}
                parts[ext] = data
        except _Truncated as e:
            # the sample being read when the file ended is lost; earlier ones are intact
            if not (e.args and e.args[0]):     # cut between members: the last sample may be whole
                yield _make_raw(key, parts, src, truncated=True) if key is not None else \
                    Raw(path, None, None, "truncated_record")
                return
            cut_key = _split_key(e.args[0])[0]
            if key is not None and cut_key != key:
                yield _make_raw(key, parts, src)
            yield Raw(cut_key, None, None, "truncated_record")
            return
        except (ValueError, OSError) as e:
            log.warning("corrupt shard %s after key %s: %s", path, key, e)
            yield Raw(key or path, None, None, "corrupt_shard")
            return
    if key is not None:
        yield _make_raw(key, parts, src)


def read_tfrecord(path: str, src: Source) -> Iterator[Raw]:
    """Samples of one TFRecord shard (tf.data), bad ones flagged (never raises for bad data)."""
    tf = xla_utils.import_tensorflow()
    from google.protobuf.message import DecodeError
    try:
        it = iter(tf.data.TFRecordDataset(path).as_numpy_iterator())
    except (tf.errors.OpError, OSError) as e:
        log.warning("unreadable shard %s: %s", path, e)
        yield Raw(path, None, None, "unreadable_shard")
        return
    i = 0
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except tf.errors.DataLossError as e:     # bad length/crc: the rest of the file is lost
            yield Raw(f"{path}#{i}", None, None,
                      "truncated_record" if "truncated" in str(e).lower() else "corrupt_record")
            return
        except (tf.errors.OpError, OSError) as e:
            log.warning("unreadable shard %s: %s", path, str(e).splitlines()[0])
            yield Raw(path, None, None, "unreadable_shard")
            return
        key = f"{os.path.basename(path)}#{i}"
        i += 1
        try:
            ex = tf.train.Example.FromString(rec)
        except DecodeError:
            yield Raw(key, None, None, "corrupt_record")
            continue
        parts = {}
        for name, feat in ex.features.feature.items():
            kind = feat.WhichOneof("kind")
            vals = getattr(feat, kind).value if kind else []
            if len(vals):
                parts[name] = vals[0]
        if "key" in parts and isinstance(parts["key"], bytes):
            key = parts["key"].decode("utf-8", "replace")
        yield _make_raw(key, parts, src)


def read_shard(path: str, src: Source) -> Iterator[Raw]:
    return read_wds(path, src) if src.fmt == "wds" else read_tfrecord(path, src)
