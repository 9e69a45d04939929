"""Where CLIPA's records come from: shard specs, format detection and record readers, and the
one-time reshard pass that rewrites shards with their images bounded (`python data.py reshard`).

Sources (docs/data.md):
  wds       webdataset tar shards as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json), read by a
            streaming tar parser of our own (exact control over truncated / corrupt records).
  tfrecord  TFRecord shards of tf.train.Example with bytes features `jpg` and `txt`, read with tf.data.
  tfds      a TFDS dataset directory (tfds.builder_from_directory); its TFRecord files are read directly.
The format comes from the files' first bytes, never from a path substring, and each shard is read by
its own (a spec may mix tars and TFRecords); an explicit flag names the format of a shard whose first
bytes show neither. Only regular files are opened as shards: a FIFO or a device is an unreadable shard.
Readers never raise for bad data: a bad record comes out flagged with the reason (Raw.reason), so
that loaders and `python data.py stats` can count and skip it. No size read from a shard is
trusted: a tar member or TFRecord record is read only when it is at most MAX_RECORD_BYTES and fits
in the bytes left in the file, so a hostile length field costs nothing (see read_wds, read_tfrecord).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import NamedTuple

import google_crc32c
from google.protobuf.message import DecodeError
from PIL import Image

import checkpoints
import storage
import transforms
import xla_utils

log = logging.getLogger("clipa.shards")

FORMATS = ("wds", "tfrecord", "tfds")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image")  # first present wins
TEXT_KEYS = ("txt", "caption", "text")
# the most bytes one tar member or TFRecord record may hold (an image, a caption, a whole
# tf.train.Example); a web image is ~10 KB-10 MB. Larger ones are bad data, never allocated.
MAX_RECORD_BYTES = 64 << 20
# the longest caption (UTF-8 bytes; characters for one given as text), checked before it is decoded:
# alt-texts are ~50-300 bytes and long synthetic captions a few KB; a tokenizer spends under 0.1 s and
# a few MB on one at the bound, minutes and GBs on a 20 MB one. Longer ones are skipped as caption_too_long.
MAX_CAPTION_BYTES = 16 << 10
# a caption of only these (whitespace, NULs, other control characters) tokenizes to an empty row
_BLANK = re.compile(r"[\s\x00-\x1f\x7f-\x9f]*")
# the most shard names one spec may expand to (a brace pattern is counted before it is expanded):
# 3x DataComp's 12.8B pool in img2dataset's 10k-sample shards, ~400 MB of names
MAX_SHARDS = 1 << 22


# ----------------------------------------------------------------------------- local or remote files

HEAD_BYTES = 512  # a shard's first bytes, read when it is opened: they tell its format


def is_remote(path: str) -> bool:
    """s3://, gs://, http(s)://, pipe:... paths (storage.py reads them)."""
    return storage.is_remote(path)


class _Shard:
    """An open shard whose first HEAD_BYTES are already read: they tell its format (a stream cannot be
    read twice), and reading them while the previous shard is still being read hides a store's latency
    (read_shards). read(n) returns n bytes until the end, seek(n, 1) skips forward, size() is the length
    when it is known (None otherwise: sizes are then only capped)."""

    def __init__(self, path: str, f):
        self.path = path
        self._f = f
        self.head = f.read(HEAD_BYTES)
        self._served = 0  # bytes of head already read

    def read(self, n: int = -1) -> bytes:
        left = len(self.head) - self._served
        if not left:
            return self._f.read(n)
        take = left if n < 0 else min(n, left)
        part = self.head[self._served : self._served + take]
        self._served += take
        if n < 0:
            return part + self._f.read()
        return part + self._f.read(n - take) if take < n else part

    def seek(self, n: int, whence: int = 1) -> None:
        if whence != 1 or n < 0:
            raise io.UnsupportedOperation(f"{self.path}: shards are read forward only")
        take = min(n, len(self.head) - self._served)
        self._served += take
        if n > take:
            self._f.seek(n - take, 1)

    def size(self) -> int | None:
        return _file_size(self._f)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_shard(path: str) -> _Shard:
    """`path` (any scheme storage.py reads) opened, its first bytes read. A local one only when it is a
    regular file: a FIFO's open() would block until a writer comes, a device's reads never end.
    OSError (one line naming the path) when it cannot be opened or read."""
    f = storage.open_read(path)
    try:
        return _Shard(path, f)
    except BaseException:
        f.close()
        raise


def _file_size(f) -> int | None:
    """Bytes in the open file `f` (a regular local file, or a stream that knows its length), None when
    it cannot tell (a pipe, a compressed HTTP body)."""
    try:
        st = os.fstat(f.fileno())
        return st.st_size if stat.S_ISREG(st.st_mode) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    try:
        return int(f.size())
    except (AttributeError, TypeError, ValueError, OSError, io.UnsupportedOperation):
        return None


# ----------------------------------------------------------------------------- shard specs


def expand_braces(pattern: str) -> list[str]:
    """`a{000..002}b{x,y}` -> 6 names (webdataset's brace expansion: zero padding kept). ValueError when
    the pattern names more than MAX_SHARDS, counted before any name is made."""
    try:
        return storage.expand_braces(pattern, MAX_SHARDS)
    except ValueError as e:
        raise ValueError(str(e).replace(" names", " shard names")) from None


def _is_shard_name(name: str) -> bool:
    """Shard files in a directory: *.tar, *.tfrecord, TFDS-style *.tfrecord-00000-of-00010."""
    return name.endswith((".tar", ".tfrec", ".record")) or ".tfrecord" in name


def _directory_shards(path: str) -> list[str] | None:
    """The shard files in directory (or store prefix) `path`, None when it is no directory."""
    if storage.scheme(path) in storage.READ_ONLY or not storage.isdir(path) or find_tfds_dir(path):
        return None
    hits = [os.path.join(path, n) for n in storage.listdir(path) if _is_shard_name(n)]
    if not hits:
        raise FileNotFoundError(f"no .tar/.tfrecord shards in directory {path!r}")
    return hits


def split_sources(spec: str) -> list[str]:
    """The '::'-joined parts of a spec: one shard list together, or the sources of a weighted mixture."""
    return [p for p in str(spec).split("::") if p]


def expand_spec(spec: str | Sequence[str]) -> list[str]:
    """Shard list from brace patterns, globs (where the store can list), directories, '::'-joined
    patterns or a list; local paths, s3://, gs://, http(s):// or pipe:COMMAND. Raises
    FileNotFoundError when nothing matches, ValueError for a scheme storage.py does not read."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    patterns = [p for s in patterns for p in str(s).split("::") if p]
    out: list[str] = []
    for pat in patterns:
        pat = storage.check_supported(pat if is_remote(pat) else os.path.expanduser(pat))
        names = expand_braces(pat)
        for p in names:
            if len(out) > MAX_SHARDS:
                raise ValueError(f"the data spec names more than {MAX_SHARDS:,} shards")
            if storage.has_glob(p):
                out.extend(storage.glob(p))
                continue
            # a store is asked whether a name is a directory only when it is the pattern's one name: a
            # 10,000-shard brace list costs no requests
            maybe_dir = not is_remote(p) or (len(names) == 1 and not _is_shard_name(os.path.basename(p)))
            hits = _directory_shards(p) if maybe_dir else None
            out.extend(sorted(hits) if hits is not None else [p])
    if len(out) > MAX_SHARDS:
        raise ValueError(f"the data spec names more than {MAX_SHARDS:,} shards")
    if not out:
        raise FileNotFoundError(f"empty data spec {spec!r}")
    local = [p for p in out if not is_remote(p)]
    if local and not any(storage.exists(p) for p in local):
        raise FileNotFoundError(
            f"no such file: {local[0]!r}" + (f" (nor the other {len(local) - 1})" if len(local) > 1 else "")
        )
    return out


def find_tfds_dir(path: str) -> str | None:
    """The TFDS version directory (holding dataset_info.json) at or up to 2 levels below path (local or
    on a store). A path holding several datasets (a TFDS data_dir) is ambiguous: ValueError naming them."""
    if storage.scheme(path) in storage.READ_ONLY:
        return None
    if is_remote(path) and _is_shard_name(os.path.basename(path)):
        return None  # a shard of a brace list: no listing request per shard
    if not storage.isdir(path):
        return None
    if storage.exists(os.path.join(path, "dataset_info.json")):
        return path
    found = sorted(
        _matches(os.path.join(path, "*", "dataset_info.json"))
        + _matches(os.path.join(path, "*", "*", "dataset_info.json"))
    )
    if not found:
        return None
    # the folders holding version folders: one per dataset (or per dataset config)
    datasets = sorted({os.path.relpath(os.path.dirname(os.path.dirname(p)), path) for p in found})
    if len(datasets) > 1:
        raise ValueError(
            f"{path} holds {len(datasets)} TFDS datasets ({', '.join(datasets)}): give one of them, "
            f"e.g. {os.path.join(path, datasets[0])}"
        )

    # newest version when several (e.g. imagenet2012/5.0.0 and 5.1.0)
    def version(p):
        return [int(x) if x.isdigit() else -1 for x in os.path.basename(os.path.dirname(p)).split(".")]

    return os.path.dirname(max(found, key=version))


def _matches(pattern: str) -> list[str]:
    try:
        return storage.glob(pattern)
    except FileNotFoundError:
        return []


# TFRecord framing: uint64 length, masked crc32c(length), data, masked crc32c(data)
def _masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
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


def _sniff(head: bytes) -> str | None:
    """'wds' | 'tfrecord' from a file's first 512 bytes, None when they show neither."""
    if _looks_tar(head):
        return "wds"
    if _looks_tfrecord(head):
        return "tfrecord"
    return None


class FormatUnknown(ValueError):
    """The shards' format cannot be told from their bytes. The message asks for --format (data.py's
    flag); a caller with another flag names its own: `raise ValueError(e.asking("--train-format"))`."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(self.asking("--format"))

    def asking(self, flag: str) -> str:
        return f"{self.what}; pass {flag}"


def detect_format(paths: Sequence[str]) -> str:
    """'wds' | 'tfrecord' | 'tfds' from the files' contents (first bytes), not from their names:
    the first of the first 16 files that can be read and is not empty decides. When none of them can
    be read, the first one's error (one line: a missing object, a 403, an unreachable endpoint)."""
    error = None
    for p in paths[:16]:
        if find_tfds_dir(p):
            return "tfds"
        try:
            with open_shard(p) as f:
                head = f.head
        except OSError as e:
            error = error or e
            continue
        if not head:
            continue  # img2dataset writes a 0-byte shard when all its downloads failed
        fmt = _sniff(head)
        if fmt is None:
            raise FormatUnknown(f"{p}: neither a tar (webdataset) nor a TFRecord file (CSV and others are not read)")
        return fmt
    if error is not None:
        raise error
    raise FormatUnknown(f"cannot detect the format of {paths[0]!r}: no readable non-empty file")


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


def _resolve_tfds(path, split: str | None) -> Source:
    """The TFDS dataset at or below path, split `split` (None: 'validation', else its only split). On a
    store, its metadata files (not the shards) are copied to a temporary directory for TFDS to read."""
    path = path if isinstance(path, str) else list(path)[0]
    if not storage.exists(path):
        raise FileNotFoundError(f"no such TFDS directory: {path!r}")
    d = find_tfds_dir(path) or path
    if not is_remote(d):
        return _tfds_source(d, d, split)
    with tempfile.TemporaryDirectory(prefix="clipa-tfds-") as meta:
        for name in storage.listdir(d):
            if not _is_shard_name(name):
                with open(os.path.join(meta, name), "wb") as f:
                    f.write(storage.read_bytes(os.path.join(d, name), MAX_RECORD_BYTES))
        return _tfds_source(meta, d, split)


def _tfds_source(local: str, d: str, split: str | None) -> Source:
    """Source of the TFDS dataset whose metadata is in local directory `local` and whose files are in `d`."""
    xla_utils.import_tensorflow()
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(local)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types; report in one line
        raise ValueError(f"{d}: not a TFDS dataset directory ({type(e).__name__}: {e})") from None
    info = builder.info
    splits = list(info.splits.keys())
    if split is None:
        if "validation" in splits or len(splits) != 1:
            split = "validation"
        else:
            split = splits[0]
    if split not in info.splits:
        raise ValueError(f"{d}: no split {split!r} (has {', '.join(splits)}): name one")
    fmt_name = str(getattr(info, "file_format", "tfrecord")).lower()
    if "tfrecord" not in fmt_name:
        raise ValueError(f"{d}: TFDS file format {fmt_name} is not supported (tfrecord only)")
    files = [os.fspath(p) if local == d else os.path.join(d, os.path.basename(p)) for p in info.splits[split].filepaths]
    image_keys = []
    text_keys = []
    label_key = None
    classes = None
    for name, feat in info.features.items():
        if isinstance(feat, tfds.features.Image):
            image_keys.append(name)
        elif isinstance(feat, tfds.features.Text):
            text_keys.append(name)
        elif isinstance(feat, tfds.features.ClassLabel):
            label_key = name
            classes = list(feat.names)
    return Source("tfds", files, tuple(image_keys) or IMAGE_KEYS, tuple(text_keys) or TEXT_KEYS, label_key, classes)


# ----------------------------------------------------------------------------- record readers


class Raw(NamedTuple):
    """One record as read from a shard. reason is None for a usable record, else why it is bad."""

    key: str
    image: bytes | None
    text: str | int | None  # caption (train) or class label (eval)
    reason: str | None = None


class _Truncated(Exception):
    pass


class _Unreadable(Exception):
    """The rest of the shard cannot be read; args[0]: the reason, args[1]: the member name."""


def _tar_members(f) -> Iterator[tuple[str, bytes | None, int, int]]:
    """(name, data, header offset, end offset) of each regular file in a tar stream (the offsets of
    its own 512-byte header and of the byte after its padding); stops at the end-of-archive marker.
    data is None for a member over MAX_RECORD_BYTES that fits in the file (skipped unread).
    Raises _Truncated(name of the member cut short, or None between members) when the file ends
    early, _Unreadable("oversized_member", name) for a member size that is over the cap and more
    than the bytes left (a hostile or garbled header: nothing after it can be found), and
    ValueError on a corrupt header."""
    long_name = None  # a GNU long name or pax path for the next member
    first = True
    end = _file_size(f)
    pos = 0
    while True:
        at = pos
        hdr = f.read(512)
        pos += len(hdr)
        if not hdr and first:  # a 0-byte shard (img2dataset: all downloads failed): no samples
            return
        first = False
        if len(hdr) < 512:  # EOF without the end-of-archive marker: the writer was cut off
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
        if size_field[0] & 0x80:  # GNU base-256 size for members > 8 GiB (0xff: negative)
            size = int.from_bytes(size_field[1:], "big") if size_field[0] == 0x80 else -1
        else:
            try:
                size = int(size_field.strip(b"\0 ") or b"0", 8)
            except ValueError:
                raise ValueError("corrupt tar header (size)") from None
        if size < 0:
            raise ValueError("corrupt tar header (negative size)")
        kind = hdr[156:157]
        if long_name is not None:
            name = long_name
        else:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        is_file = kind in (b"0", b"\0", b"7")
        left = None if end is None else end - pos
        if size > MAX_RECORD_BYTES:
            if left is None or size + (-size) % 512 > left:
                raise _Unreadable("oversized_member", name if is_file else None)
            f.seek(size + (-size) % 512, 1)  # skipped unread; the next header follows
            pos += size + (-size) % 512
            long_name = None
            if is_file:
                yield name, None, at, pos
            continue
        if left is not None and size > left:  # the file ends inside this member
            raise _Truncated(name if is_file else None)
        data = f.read(size)
        pos += len(data)
        if len(data) < size:
            raise _Truncated(name if is_file else None)
        pos += len(f.read((-size) % 512))
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax header: take the path
            for rec in data.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        long_name = None
        if not is_file:
            continue
        yield name, data, at, pos


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _next_sample(key: str | None, parts: dict, k: str, ext: str) -> bool:
    """Whether member k.ext starts a new sample after sample `key` holding `parts`: another key, or
    an extension the sample already has (OpenCLIP's webdataset grouping: two adjacent samples with
    one key are two samples; webdataset's own raises "duplicate file name")."""
    return k != key or ext in parts


def _make_raw(key: str, parts: dict, src: Source, truncated: bool = False) -> Raw:
    if any(v is None for v in parts.values()):  # a member over MAX_RECORD_BYTES, skipped
        return Raw(key, None, None, "oversized_member")
    image = next((parts[k] for k in src.image_keys if k in parts), None)
    if not isinstance(image, (bytes, bytearray, type(None))):  # e.g. a TFRecord int64 feature
        image = None
    if src.label_key is not None:
        if image is None:
            return Raw(key, None, None, "truncated_record" if truncated else "missing_image")
        try:
            label = int(parts[src.label_key])
        except (KeyError, TypeError, ValueError):
            return Raw(key, None, None, "truncated_record" if truncated else "missing_label")
        return Raw(key, image, label)
    text = next((parts[k] for k in src.text_keys if k in parts), None)
    if not isinstance(text, (bytes, str, type(None))):
        text = None
    if image is None or text is None:
        if truncated:
            return Raw(key, None, None, "truncated_record")
        return Raw(key, None, None, "missing_image" if image is None else "missing_caption")
    if not image:
        return Raw(key, None, None, "empty_image")
    if len(text) > MAX_CAPTION_BYTES:  # bytes, or characters of a text: each is at least one byte
        return Raw(key, None, None, "caption_too_long")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return Raw(key, None, None, "bad_caption_encoding")
    text = text.strip()
    if _BLANK.fullmatch(text):
        return Raw(key, None, None, "empty_caption")
    return Raw(key, image, text)


def read_wds(path: str, src: Source) -> Iterator[Raw]:
    """Samples of one webdataset tar shard, bad ones flagged (never raises for bad data).
    Per sample: a member over MAX_RECORD_BYTES that fits in the file is skipped unread and its
    sample flagged oversized_member. Once per shard, losing the rest of it: a size beyond the
    bytes left (oversized_member, or truncated_record when under the cap: a cut-off writer), a
    corrupt header (corrupt_shard), a file that cannot be opened or read (unreadable_shard)."""
    yield from _read_opened(path, src, None, "wds")


def _read_wds(path: str, f: _Shard, src: Source) -> Iterator[Raw]:
    key, parts = None, {}
    try:
        for name, data, _, _ in _tar_members(f):
            k, ext = _split_key(name)
            if _next_sample(key, parts, k, ext):
                if key is not None:
                    yield _make_raw(key, parts, src)
                key, parts = k, {}
            parts[ext] = data
    except (_Truncated, _Unreadable) as e:
        # the sample being read when the file ended is lost; earlier ones are intact
        reason = e.args[0] if isinstance(e, _Unreadable) else "truncated_record"
        name = e.args[-1] if e.args else None
        if not name:  # between samples' members: the last sample may be whole
            if isinstance(e, _Unreadable):
                log.warning(
                    "%s: a member after key %s is over %d bytes and past the end of "
                    "the file: rest of the shard skipped",
                    path,
                    key,
                    MAX_RECORD_BYTES,
                )
                if key is not None:
                    yield _make_raw(key, parts, src)
                yield Raw(key or path, None, None, reason)
            else:
                yield (_make_raw(key, parts, src, truncated=True) if key is not None else Raw(path, None, None, reason))
            return
        cut_key, cut_ext = _split_key(name)
        if key is not None and _next_sample(key, parts, cut_key, cut_ext):
            yield _make_raw(key, parts, src)
        if isinstance(e, _Unreadable):
            log.warning(
                "%s: member %s is over %d bytes and past the end of the file: rest of the shard skipped",
                path,
                name,
                MAX_RECORD_BYTES,
            )
        yield Raw(cut_key, None, None, reason)
        return
    except ValueError as e:
        log.warning("corrupt shard %s after key %s: %s", path, key, e)
        yield Raw(key or path, None, None, "corrupt_shard")
        return
    except OSError as e:
        log.warning("unreadable shard %s after key %s: %s", path, key, e)
        yield Raw(key or path, None, None, "corrupt_shard" if key is not None else "unreadable_shard")
        return
    if key is not None:
        yield _make_raw(key, parts, src)


def _tfrecord_frames(f) -> Iterator[tuple[bytes | None, str | None, int]]:
    """(record bytes, None, offset) for each record of a TFRecord stream, in one forward pass; where
    the rest of the file cannot be read, a last (None, why, offset). A length is trusted only with its
    CRC, at most MAX_RECORD_BYTES and within the file when its size is known: a hostile length costs
    nothing. A record whose data fails its CRC is (None, "corrupt_record", offset) and reading goes on
    (its length was sound, so the next record is found)."""
    end = _file_size(f)
    at = 0
    while True:
        head = f.read(12)
        if not head:
            return
        if len(head) < 12:
            yield None, "truncated_record", at
            return
        length, crc = struct.unpack("<QI", head)
        if crc != _masked_crc32c(head[:8]):
            yield None, "corrupt_record", at
            return
        if length > MAX_RECORD_BYTES:
            yield None, "oversized_record", at
            return
        if end is not None and at + 16 + length > end:
            yield None, "truncated_record", at
            return
        data = f.read(length)
        tail = f.read(4)
        if len(data) < length or len(tail) < 4:
            yield None, "truncated_record", at
            return
        ok = struct.unpack("<I", tail)[0] == _masked_crc32c(data)
        yield (data, None, at) if ok else (None, "corrupt_record", at)
        at += 16 + length


def _example_parts(ex) -> dict:
    """feature name -> first value of a tf.train.Example's non-empty features."""
    parts = {}
    for name, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        vals = getattr(feat, kind).value if kind else []
        if len(vals):
            parts[name] = vals[0]
    return parts


def _tfrecord_items(path: str, f: _Shard, src: Source) -> Iterator[tuple[Raw, bytes | None, int]]:
    """(Raw, the record's bytes, its offset in the file) per record of the open TFRecord shard `f`;
    when the rest of the file cannot be read, a last flagged Raw with None and the offset where it
    starts. tf.train.Example parses the records; the framing is ours, so that any stream is read."""
    example = xla_utils.import_tensorflow().train.Example
    i = 0  # records so far, bad ones too
    try:
        for rec, reason, at in _tfrecord_frames(f):
            key = f"{os.path.basename(path)}#{i}"
            i += 1
            if rec is None:
                log.warning("%s: %s at byte %d (record %d)", path, reason, at, i - 1)
                yield Raw(f"{path}#{i - 1}", None, None, reason), None, at
                continue
            try:
                parts = _example_parts(example.FromString(rec))
            except DecodeError:
                yield Raw(key, None, None, "corrupt_record"), rec, at
                continue
            if "key" in parts and isinstance(parts["key"], bytes):
                key = parts["key"].decode("utf-8", "replace")
            yield _make_raw(key, parts, src), rec, at
    except OSError as e:  # the store or the command failed mid-shard: the rest of it is lost
        log.warning("unreadable shard %s after record %d: %s", path, i, e)
        yield Raw(path, None, None, "unreadable_shard" if i == 0 else "corrupt_shard"), None, -1


def read_tfrecord(path: str, src: Source) -> Iterator[Raw]:
    """Samples of one TFRecord shard, bad ones flagged (never raises for bad data). What ends the file
    early (truncated_record, corrupt_record in a length, oversized_record) is one skip for the rest of
    the shard; a record whose data fails its CRC is one skip."""
    yield from _read_opened(path, src, None, "tfrecord")


def _read_opened(path: str, src: Source, opened, fmt: str | None = None) -> Iterator[Raw]:
    """The records of shard `path`: `opened` (a future of open_shard, or None to open it here), read by
    `fmt` or else by what its first bytes show (a spec may mix tars and TFRecords; src.fmt decides for a
    shard whose first bytes show neither)."""
    try:
        f = opened.result() if opened is not None else open_shard(path)
    except OSError as e:
        log.warning("unreadable shard %s: %s", path, e)
        yield Raw(path, None, None, "unreadable_shard")
        return
    with f:
        fmt = fmt or ("tfrecord" if src.fmt == "tfds" else _sniff(f.head) or src.fmt)
        if fmt == "wds":
            yield from _read_wds(path, f, src)
        else:
            yield from (raw for raw, _, _ in _tfrecord_items(path, f, src))


def read_shard(path: str, src: Source) -> Iterator[Raw]:
    """Samples of one shard, read by its own format (a spec may mix tars and TFRecords)."""
    yield from _read_opened(path, src, None)


def read_shards(paths: Sequence[str], src: Source) -> Iterator[Iterator[Raw]]:
    """read_shard of each of `paths` in turn, each shard opened (connection made, first bytes read) in a
    background thread while the one before it is read: a store's per-shard latency (a request, a
    command starting) is hidden behind the reading. Consume each shard's records before the next."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="clipa-shard-open")
    ahead = None
    try:
        for i, path in enumerate(paths):
            opened = ahead if ahead is not None else pool.submit(open_shard, path)
            ahead = pool.submit(open_shard, paths[i + 1]) if i + 1 < len(paths) else None
            yield _read_opened(path, src, opened)
    finally:
        if ahead is not None:
            ahead.add_done_callback(_close_opened)
        pool.shutdown(wait=False, cancel_futures=True)


def _close_opened(future) -> None:
    """A shard opened ahead that nobody will read: closed (its connection or command let go)."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()


# ----------------------------------------------------------------------------- resharding
# `python data.py reshard SRC DST --max-side N`: every shard rewritten in its own format under its
# own name, each good sample's image re-encoded to a bounded side and everything else copied: a tar
# member by member (headers, other fields, bad samples, a truncated or corrupt tail: the same
# bytes), a TFRecord record by record (a changed record is its Example re-serialized with the new
# image: every other feature's value is the same bytes). So the loader reads the same samples and
# skips the same bad ones. Each shard is written atomically and verified before it is renamed into
# place; a rerun skips the shards already there.

RESHARD_QUALITY = 95  # img2dataset's default: the re-encode adds little beyond the resize
RESHARD_SETTINGS = ".reshard.json"
RESHARD_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # re-encoded in their own format; others kept
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def bound_image(
    data: bytes, max_side: int, quality: int = RESHARD_QUALITY, max_pixels: int | None = None
) -> tuple[bytes | None, str]:
    """(the image re-encoded with its longest side max_side, 'resized') or (None, 'within' | 'kept')
    when the bytes stay: already within max_side, or not a JPEG/PNG/WebP that decodes (the loader
    treats it as it did), or over max_pixels. Antialiased bicubic downscale of the whole image,
    aspect kept, in its own format; L stays L (16-bit grayscale becomes 8-bit L by the loader's
    transforms.eight_bit), other modes become RGB as the loader converts them
    (before resizing, so alpha is dropped as the loader drops it); EXIF and ICC are not kept (the
    loader reads neither). A JPEG is decoded at a DCT scale that keeps >= 3x the target size."""
    try:
        img = Image.open(io.BytesIO(data))
        W, H = img.size
    except Exception:  # noqa: BLE001 - any image the loader cannot open is kept as it is
        return None, "kept"
    if max(W, H) <= max_side:
        return None, "within"
    if img.format not in RESHARD_IMAGE_FORMATS or (max_pixels is not None and max_pixels < W * H):
        return None, "kept"
    s = max_side / max(W, H)
    size = (max(1, round(W * s)), max(1, round(H * s)))
    fmt = img.format
    save_options = {
        "JPEG": {"quality": quality, "optimize": True, "subsampling": "4:2:0"},  # baseline, libjpeg's 4:2:0 chroma
        "PNG": {},
        "WEBP": {"quality": quality},
    }
    out = io.BytesIO()
    try:
        if fmt == "JPEG":
            img.draft(None, (3 * size[0], 3 * size[1]))
        img = transforms.eight_bit(img)
        img.convert("L" if img.mode == "L" else "RGB").resize(size, Image.BICUBIC).save(out, fmt, **save_options[fmt])
    except Exception:  # noqa: BLE001 - a corrupt image: the loader skips it as bad_image, so keep it
        return None, "kept"
    return out.getvalue(), "resized"


def _copy_bytes(src_file, dst_file, n: int | None):
    """n bytes (None: all that is left) from one open file to another, 1 MiB at a time."""
    while n is None or n > 0:
        chunk = src_file.read(1 << 20 if n is None else min(n, 1 << 20))
        if not chunk:
            if n:
                raise OSError(f"the file ended {n} bytes early while it was being copied")
            return
        dst_file.write(chunk)
        n = None if n is None else n - len(chunk)


def _rewrite_wds(path: str, out, src: Source, fix):
    """Tar shard `path` into the open file `out`: the same bytes, except that each good sample's
    image member gets fix(image) (None: unchanged) as its data, with its header's size and
    checksum. Members are copied from a second handle, in order; where reading stops (the
    end-of-archive marker, a truncated or corrupt tail) the rest of the file is copied as it is."""
    with storage.open_read(path) as f, storage.open_read(path) as g:
        copied = 0  # bytes of g written to out

        def flush(key, parts, members):
            nonlocal copied
            raw = _make_raw(key, parts, src)
            new = None
            if raw.reason is None:
                ext = next(k for k in src.image_keys if k in parts)
                target = max(i for i, m in enumerate(members) if m[0] == ext)  # the last one is read
                new = fix(raw.image)
            for i, (_, hdr_at, end) in enumerate(members):
                if new is None or i != target or hdr_at - copied > 1 << 20:
                    _copy_bytes(g, out, end - copied)
                    copied = end
                    continue
                prefix = g.read(hdr_at - copied)  # other entries, long-name / pax headers
                hdr = bytearray(g.read(512))
                if b" size=" in prefix or len(hdr) < 512:  # a pax size would override ours
                    out.write(prefix + hdr)
                    _copy_bytes(g, out, end - hdr_at - 512)
                else:
                    g.seek(end - hdr_at - 512, 1)
                    hdr[124:136] = b"%011o\0" % len(new)
                    hdr[148:156] = b" " * 8
                    hdr[148:156] = b"%06o\0 " % sum(hdr)
                    out.write(prefix + bytes(hdr) + new + b"\0" * (-len(new) % 512))
                copied = end

        key, parts, members = None, {}, []
        for m in _members_or_stop(f):
            if m is None:  # the current sample on is copied as it is: the loader loses it again
                key = None
                break
            k, ext = _split_key(m[0])
            if _next_sample(key, parts, k, ext):
                if key is not None:
                    flush(key, parts, members)
                key, parts, members = k, {}, []
            parts[ext] = m[1]
            members.append((ext, m[2], m[3]))
        if key is not None:
            flush(key, parts, members)
        _copy_bytes(g, out, None)


def _members_or_stop(f):
    """_tar_members, then None when reading stops early (a truncated or corrupt tail)."""
    try:
        yield from _tar_members(f)
    except (_Truncated, _Unreadable, ValueError):
        yield None


def _rewrite_tfrecord(path: str, tmp: str, src: Source, fix):
    """TFRecord shard `path` into file `tmp`: each good record's image feature replaced by
    fix(image) (None: the record's bytes unchanged); a tail that cannot be read is copied as it is."""
    tf = xla_utils.import_tensorflow()
    tail = None
    with open_shard(path) as f, tf.io.TFRecordWriter(tmp) as w:
        for raw, rec, at in _tfrecord_items(path, f, src):
            if raw.reason in ("unreadable_shard", "corrupt_shard"):
                raise OSError(f"cannot read {path}")
            if rec is None:  # the rest is copied as it is (a record that fails its CRC too): read alike
                tail = at
                break
            new = fix(raw.image) if raw.reason is None else None
            if new is not None:
                ex = tf.train.Example.FromString(rec)
                parts = _example_parts(ex)
                ex.features.feature[next(k for k in src.image_keys if k in parts)].bytes_list.value[0] = new
                rec = ex.SerializeToString()
            w.write(rec)
    if tail is not None:
        with storage.open_read(path) as g, open(tmp, "ab") as out:
            g.seek(tail, 1)
            _copy_bytes(g, out, None)


def _image_side(data: bytes) -> int | None:
    try:
        return max(Image.open(io.BytesIO(data)).size)
    except Exception:  # noqa: BLE001
        return None


def verify_reshard(path: str, out: str, src: Source, max_side: int) -> Counter:
    """Read source shard `path` and its resharded copy `out` as the loader does: the same records
    (keys, captions, skip reasons) in the same order, and each image that changed decodes with
    its longest side <= max_side. Returns counts (samples, bad_samples, images_resized / _within
    / _kept); raises RuntimeError at the first difference."""
    c: Counter = Counter()

    def name(k):  # a key read from `out` as it reads from `path`
        return k.replace(out, path).replace(os.path.basename(out), os.path.basename(path))

    quiet = log.disabled
    log.disabled = True  # the reader's warnings were given when copying
    try:
        for a, b in itertools.zip_longest(read_shard(path, src), read_shard(out, src)):
            if a is None or b is None:
                raise RuntimeError(
                    f"{out}: {'more' if a is None else 'fewer'} records than {path} after {c['samples']}"
                )
            if (name(b.key), b.reason, b.text) != (a.key, a.reason, a.text):
                raise RuntimeError(
                    f"{out}: record {c['samples']} is {(b.key, b.reason, b.text)!r}, "
                    f"in {path} {(a.key, a.reason, a.text)!r}"
                )
            c["samples"] += 1
            if a.reason is not None:
                c["bad_samples"] += 1
            elif b.image == a.image:
                side = _image_side(a.image)
                c["images_within" if side is not None and side <= max_side else "images_kept"] += 1
            else:
                img = Image.open(io.BytesIO(b.image))
                img.load()
                if max(img.size) > max_side:
                    raise RuntimeError(f"{out}: {b.key} is {img.size[0]}x{img.size[1]}, over {max_side}")
                c["images_resized"] += 1
    finally:
        log.disabled = quiet
    return c


def _file_bytes(path: str) -> int:
    with storage.open_read(path) as f:
        return _file_size(f) or 0


def _reshard_shard(job) -> dict:
    """One shard (a process-pool task): rewrite, verify, rename into place; its counts and bytes,
    or {"shard", "error"} when the source cannot be read or the copy cannot be written."""
    path, dst, src, max_side, quality, max_pixels = job
    counts: Counter = Counter()

    def fix(image):
        return bound_image(image, max_side, quality, max_pixels)[0]

    def write(tmp):
        with open_shard(path) as f:
            fmt = _sniff(f.head) or src.fmt
        if fmt == "wds":
            with open(tmp, "wb") as out:
                _rewrite_wds(path, out, src, fix)
        else:
            _rewrite_tfrecord(path, tmp, src, fix)
        counts.update(verify_reshard(path, tmp, src, max_side))

    try:
        before = _file_bytes(path)
        checkpoints.atomic_write(dst, write)
    except OSError as e:
        return {"shard": path, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}"}
    return {"shard": path, **counts, "bytes_before": before, "bytes_after": os.path.getsize(dst)}


def _die_with_parent(parent: int):
    """A reshard pool worker's initializer: the worker ends when the reshard process does, even by
    SIGKILL, instead of writing more shards into DST without its lock and then waiting forever on
    a queue nobody feeds. Linux sends SIGKILL at the parent's death (prctl); elsewhere, and in case
    the parent died before that was set, a thread watches the parent's id."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


@dataclass
class ReshardPlan:
    src: Source
    dst: str
    max_side: int
    quality: int
    workers: int
    max_pixels: int | None
    todo: list[str]  # source shards to write
    done: int  # shards already in dst
    lock: object


def reshard_plan(
    src: Source,
    dst: str,
    max_side: int,
    quality: int = RESHARD_QUALITY,
    workers: int = 1,
    max_pixels: int | None = None,
) -> ReshardPlan:
    """Check a reshard before any work (ValueError / OSError: one line for the user), take DST's
    lock (one reshard per DST), remove temporary files a killed run left, record the settings."""
    if src.fmt == "tfds":
        raise ValueError("reshard reads webdataset tar or TFRecord shards, not a TFDS directory")
    if is_remote(dst):
        raise ValueError(f"DST must be a local directory, got {dst!r} (copy the result with gsutil)")
    if max_side < 1 or not 1 <= quality <= 100 or workers < 1:
        raise ValueError(
            f"--max-side and --workers must be >= 1 and --quality in 1..100, got {max_side}, {workers}, {quality}"
        )
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"DST {dst!r} is a file, not a directory")
    names = [os.path.basename(p) for p in src.shards]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise ValueError(f"two source shards are named {twice!r}; DST keeps the shard names")
    if any(not is_remote(p) and os.path.realpath(os.path.dirname(p)) == os.path.realpath(dst) for p in src.shards):
        raise ValueError(f"DST {dst!r} is the source directory: write the resharded shards elsewhere")
    settings = {"format": src.fmt, "max_side": max_side, "quality": quality}
    record = os.path.join(dst, RESHARD_SETTINGS)
    done = [n for n in names if os.path.exists(os.path.join(dst, n))]
    if os.path.exists(record):
        with open(record) as f:
            old = json.load(f)
        if old != settings:
            raise ValueError(
                f"{dst} was resharded with {json.dumps(old)}, not {json.dumps(settings)}: "
                f"resume with those settings or write to another DST"
            )
    elif done:
        raise ValueError(f"{dst} already holds {done[0]} but no {RESHARD_SETTINGS}: not a reshard output")
    os.makedirs(dst, exist_ok=True)
    try:
        lock = checkpoints.RunLock(dst).acquire()
    except checkpoints.LockBusy:
        raise ValueError(f"another reshard is writing {dst}") from None
    checkpoints.remove_temporaries(dst)
    checkpoints.atomic_write_text(json.dumps(settings) + "\n", record)
    return ReshardPlan(
        src=src,
        dst=dst,
        max_side=max_side,
        quality=quality,
        workers=workers,
        max_pixels=max_pixels,
        todo=[p for p, n in zip(src.shards, names) if n not in done],
        done=len(done),
        lock=lock,
    )


def reshard(plan: ReshardPlan, progress: bool = True) -> dict:
    """Write plan.todo, plan.workers processes over shards (a tqdm bar on stderr); the summary
    (counts and bytes of the shards written now; a failed shard is listed and stays missing, so
    that a rerun retries it)."""
    from tqdm import tqdm

    t0 = time.time()
    rows = []
    jobs = [
        (p, os.path.join(plan.dst, os.path.basename(p)), plan.src, plan.max_side, plan.quality, plan.max_pixels)
        for p in plan.todo
    ]
    bar = tqdm(
        total=len(plan.src.shards),
        initial=plan.done,
        unit="shard",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    pool = None
    try:
        if plan.workers > 1 and len(jobs) > 1:
            if plan.src.fmt == "tfrecord":
                xla_utils.import_tensorflow()  # once, before forking (as the loader does)
            pool = ProcessPoolExecutor(
                min(plan.workers, len(jobs)),
                mp_context=multiprocessing.get_context("fork"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
            results = (fut.result() for fut in as_completed([pool.submit(_reshard_shard, j) for j in jobs]))
        else:
            results = map(_reshard_shard, jobs)
        for r in results:
            rows.append(r)
            before = sum(x.get("bytes_before", 0) for x in rows)
            after = sum(x.get("bytes_after", 0) for x in rows)
            bar.set_postfix_str(f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB", refresh=False)
            bar.update(1)
            if "error" in r:
                log.warning("%s not resharded: %s", r["shard"], r["error"])
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        plan.lock.release()
    total = Counter()
    for r in rows:
        total.update({k: v for k, v in r.items() if isinstance(v, int)})
    failed = [r for r in rows if "error" in r]
    log.info(
        "%d shards written (%d already there, %d failed): %.1f MB -> %.1f MB",
        len(rows) - len(failed),
        plan.done,
        len(failed),
        total["bytes_before"] / 1e6,
        total["bytes_after"] / 1e6,
    )
    keys = ("samples", "bad_samples", "images_resized", "images_within", "images_kept", "bytes_before", "bytes_after")
    return {
        "format": plan.src.fmt,
        "dst": plan.dst,
        "max_side": plan.max_side,
        "quality": plan.quality,
        "shards": len(plan.src.shards),
        "written": len(rows) - len(failed),
        "already_done": plan.done,
        "failed": len(failed),
        **{k: total[k] for k in keys},
        "size_ratio": round(total["bytes_after"] / max(total["bytes_before"], 1), 4),
        "seconds": round(time.time() - t0, 1),
        "failed_shards": [f"{r['shard']}: {r['error']}" for r in failed],
    }
