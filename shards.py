"""Where CLIPA's records come from: shard specs, format detection and record readers.

Sources (CLIPA_SPEC section 5):
  wds       webdataset tar shards as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json), read by a
            streaming tar parser of our own (exact control over truncated / corrupt records).
  tfrecord  TFRecord shards of tf.train.Example with bytes features `jpg` and `txt`, read with tf.data.
  tfds      a TFDS dataset directory (tfds.builder_from_directory); its TFRecord files are read directly.
The format comes from an explicit flag or from the files' first bytes, never from a path substring.
Readers never raise for bad data: a bad record comes out flagged with the reason (Raw.reason), so
that loaders and `python data.py stats` can count and skip it. No size read from a shard is
trusted: a tar member or TFRecord record is read only when it is at most MAX_RECORD_BYTES and fits
in the bytes left in the file, so a hostile length field costs nothing (see read_wds, read_tfrecord).
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import xla_utils

log = logging.getLogger("clipa.shards")

FORMATS = ("wds", "tfrecord", "tfds")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image")    # first present wins
TEXT_KEYS = ("txt", "caption", "text")
# the most bytes one tar member or TFRecord record may hold (an image, a caption, a whole
# tf.train.Example); a web image is ~10 KB-10 MB. Larger ones are bad data, never allocated.
MAX_RECORD_BYTES = 64 << 20


# ----------------------------------------------------------------------------- local or remote files

def is_remote(path: str) -> bool:
    """gs://, s3://, ... paths: read through TensorFlow's gfile."""
    return "://" in path


def _open(path: str):
    if is_remote(path):
        return xla_utils.import_tensorflow().io.gfile.GFile(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _read_errors(path: str) -> tuple:
    """What reading `path` raises when the file cannot be read: OSError, and TensorFlow's
    OpError (not an OSError) for gs://, s3://, ... paths."""
    if is_remote(path):
        return OSError, xla_utils.import_tensorflow().errors.OpError
    return (OSError,)


def _file_size(f) -> int | None:
    """Bytes in the open file `f` (a regular local file or a gfile), None when it cannot tell
    (a pipe, say)."""
    try:
        st = os.fstat(f.fileno())
        return st.st_size if stat.S_ISREG(st.st_mode) else None
    except (AttributeError, OSError, ValueError):
        pass
    try:
        return int(f.size())
    except Exception:  # noqa: BLE001 - any stream without a size: sizes are then only capped
        return None


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


class _Unreadable(Exception):
    """The rest of the shard cannot be read; args[0]: the reason, args[1]: the member name."""


def _tar_members(f) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of each regular file in a tar stream; stops at the end-of-archive marker.
    data is None for a member over MAX_RECORD_BYTES that fits in the file (skipped unread).
    Raises _Truncated(name of the member cut short, or None between members) when the file ends
    early, _Unreadable("oversized_member", name) for a member size that is over the cap and more
    than the bytes left (a hostile or garbled header: nothing after it can be found), and
    ValueError on a corrupt header."""
    long_name, first = None, True
    end, pos = _file_size(f), 0
    while True:
        hdr = f.read(512)
        pos += len(hdr)
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
        if size_field[0] & 0x80:   # GNU base-256 size for members > 8 GiB (0xff: negative)
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
            f.seek(size + (-size) % 512, 1)       # skipped unread; the next header follows
            pos += size + (-size) % 512
            long_name = None
            if is_file:
                yield name, None
            continue
        if left is not None and size > left:     # the file ends inside this member
            raise _Truncated(name if is_file else None)
        data = f.read(size)
        pos += len(data)
        if len(data) < size:
            raise _Truncated(name if is_file else None)
        pos += len(f.read((-size) % 512))
        if kind == b"L":           # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":           # pax header: take the path
            for rec in data.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        long_name = None
        if not is_file:
            continue
        yield name, data


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _make_raw(key: str, parts: dict, src: Source, truncated: bool = False) -> Raw:
    if any(v is None for v in parts.values()):       # a member over MAX_RECORD_BYTES, skipped
        return Raw(key, None, None, "oversized_member")
    image = next((parts[k] for k in src.image_keys if k in parts), None)
    if not isinstance(image, (bytes, bytearray, type(None))):     # e.g. a TFRecord int64 feature
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
    """Samples of one webdataset tar shard, bad ones flagged (never raises for bad data).
    Per sample: a member over MAX_RECORD_BYTES that fits in the file is skipped unread and its
    sample flagged oversized_member. Once per shard, losing the rest of it: a size beyond the
    bytes left (oversized_member, or truncated_record when under the cap: a cut-off writer), a
    corrupt header (corrupt_shard), a file that cannot be opened or read (unreadable_shard)."""
    errors = _read_errors(path)
    try:
        f = _open(path)
    except errors as e:
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
        except (_Truncated, _Unreadable) as e:
            # the sample being read when the file ended is lost; earlier ones are intact
            reason = e.args[0] if isinstance(e, _Unreadable) else "truncated_record"
            name = e.args[-1] if e.args else None
            if not name:        # between samples' members: the last sample may be whole
                if isinstance(e, _Unreadable):
                    log.warning("%s: a member after key %s is over %d bytes and past the end of "
                                "the file: rest of the shard skipped", path, key, MAX_RECORD_BYTES)
                    if key is not None:
                        yield _make_raw(key, parts, src)
                    yield Raw(key or path, None, None, reason)
                else:
                    yield _make_raw(key, parts, src, truncated=True) if key is not None else \
                        Raw(path, None, None, reason)
                return
            cut_key = _split_key(name)[0]
            if key is not None and cut_key != key:
                yield _make_raw(key, parts, src)
            if isinstance(e, _Unreadable):
                log.warning("%s: member %s is over %d bytes and past the end of the file: rest "
                            "of the shard skipped", path, name, MAX_RECORD_BYTES)
            yield Raw(cut_key, None, None, reason)
            return
        except ValueError as e:
            log.warning("corrupt shard %s after key %s: %s", path, key, e)
            yield Raw(key or path, None, None, "corrupt_shard")
            return
        except errors as e:
            log.warning("unreadable shard %s after key %s: %s", path, key, e)
            yield Raw(key or path, None, None, "corrupt_shard" if key is not None else "unreadable_shard")
            return
    if key is not None:
        yield _make_raw(key, parts, src)


def _scan_tfrecord(f) -> tuple[int, str | None]:
    """Check a TFRecord file's framing without reading record data (headers and seeks only):
    (records framed soundly before the first bad one, None or why the file ends there). A length
    is trusted only with its CRC, at most MAX_RECORD_BYTES and within the file: tf.data would
    otherwise allocate what a hostile length asks for (2^62 bytes: a segfault)."""
    end, pos, n = _file_size(f), 0, 0
    while True:
        head = f.read(12)
        if not head:
            return n, None
        if len(head) < 12:
            return n, "truncated_record"
        length, crc = struct.unpack("<QI", head)
        if crc != _masked_crc32c(head[:8]):
            return n, "corrupt_record"
        if length > MAX_RECORD_BYTES:
            return n, "oversized_record"
        pos += 12 + length + 4
        if end is not None and pos > end:
            return n, "truncated_record"
        f.seek(length + 4, 1)
        n += 1


def read_tfrecord(path: str, src: Source) -> Iterator[Raw]:
    """Samples of one TFRecord shard (tf.data), bad ones flagged (never raises for bad data).
    The framing is checked first (_scan_tfrecord): tf.data reads only the soundly framed
    records, and what ends the file early (truncated_record, corrupt_record, oversized_record)
    is one skip for the rest of the shard, like a record whose data fails its CRC."""
    tf = xla_utils.import_tensorflow()
    from google.protobuf.message import DecodeError
    try:
        with _open(path) as f:
            sound, tail = _scan_tfrecord(f)
        ds = tf.data.TFRecordDataset(path)
        it = iter((ds.take(sound) if tail else ds).as_numpy_iterator())
    except (tf.errors.OpError, OSError) as e:
        log.warning("unreadable shard %s: %s", path, str(e).splitlines()[0] if str(e) else e)
        yield Raw(path, None, None, "unreadable_shard")
        return
    i = 0
    while True:
        try:
            rec = next(it)
        except StopIteration:
            if tail:
                log.warning("%s: %s after record %d, the rest of the shard skipped", path, tail, i)
                yield Raw(f"{path}#{i}", None, None, tail)
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
