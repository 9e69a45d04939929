"""What a run leaves on disk, written so that a kill or a full disk at any moment loses nothing.

Atomic files and directories (write a temporary, fsync, rename), checkpoint directories (`latest`
always names a complete one; pruned to --keep), the run lock (one run per output directory), and
the one resolver of checkpoint paths; on an object store (s3://, gs://), checkpoints staged locally,
uploaded, verified against their manifest, then committed by the `latest` object. Host-only: the runtime (xla_utils) brings tensors to the host
first. Write failures surface as OSError, whatever library wrote, so that the trainer can tell a
full disk (warn, keep the previous checkpoint, go on) from a bug (traceback).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import tempfile
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import storage

# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write_fn) -> str:
    """Write a file atomically: write_fn(tmp_path) writes it, then fsync and rename over `path`.
    A reader (or a resumed run after a kill) sees the old file or the new one, never half of one."""
    storage.write_local_atomic(path, write_fn)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))  # the rename itself survives a power cut
    return path


def atomic_write_text(text: str, path: str) -> str:
    return atomic_write(path, lambda p: pathlib.Path(p).write_text(text))


def atomic_dir(final_dir: str, fill_fn) -> str:
    """Create a directory atomically: fill_fn(tmp_dir) writes the files (each fsync'ed), then
    the directory is renamed into place. An existing final_dir is replaced."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final_dir)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill_fn(tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.rename(tmp, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(parent)
    return final_dir


# ----------------------------------------------------------------------------- checkpoint directories


class RawFile(io.RawIOBase):
    """An unbuffered file that torch.save writes through, so a full disk raises OSError(ENOSPC):
    given a path, torch.save reports it as a RuntimeError ("unexpected pos ..."), a buffered file
    only when it is closed. Writes all of every buffer (a write may be short)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        return done

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def save_state(obj, path: str):
    """torch.save(obj, path), a full disk raised as OSError (obj: weights_only-loadable types)."""
    with RawFile(path) as f:
        torch.save(obj, f)


def save_weights(weights: dict, path: str, metadata: dict | None = None):
    """safetensors.save_file, its I/O errors raised as the OSError they are (it reports a full disk
    as SafetensorError "... I/O error: No space left on device (os error 28)")."""
    try:
        save_file(weights, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e


def _step_dirs(root: str) -> list[str]:
    """The step_NNNNNNNN checkpoint directories in root, oldest first."""
    return sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d))


def write_checkpoint(
    root: str,
    name: str,
    weights: dict,
    weights_metadata: dict,
    train_state: dict,
    meta: dict,
    *,
    keep: int,
    protected=(),
) -> str:
    """ROOT/NAME/{model.safetensors, train_state.pt, meta.json} (host tensors) as one atomic directory, then
    ROOT/latest names it, then the step directories beyond the newest `keep` are deleted (except
    `protected` ones). `latest` always names a complete checkpoint, even when NAME is re-saved."""
    pointer = os.path.join(root, "latest")
    if os.path.isdir(os.path.join(root, name)):
        # re-saving what `latest` may name (after --resume of an older one): point it at an older
        # complete checkpoint first, so that a kill in between never leaves it dangling
        older = [d for d in _step_dirs(root) if d < name]
        if older:
            atomic_write_text(older[-1] + "\n", pointer)
        elif os.path.exists(pointer):
            os.remove(pointer)

    def fill(d):
        save_weights(weights, os.path.join(d, "model.safetensors"), weights_metadata)
        save_state(train_state, os.path.join(d, "train_state.pt"))
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    path = atomic_dir(os.path.join(root, name), fill)
    atomic_write_text(name + "\n", pointer)
    # only the steps up to this one count: newer ones (a skipped corrupt checkpoint, a future left by
    # resuming an older one) must never push out the checkpoint `latest` now names
    for d in [d for d in _step_dirs(root) if d <= name][:-keep]:
        if d not in protected:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return path


def remove_temporaries(parent: str) -> list[str]:
    """Delete what atomic_write / atomic_dir leave behind when a process is killed mid-write
    (.NAME.tmpPID). Call only while holding the run lock: then no other writer is active."""
    if not os.path.isdir(parent):
        return []
    gone = []
    for name in os.listdir(parent):
        if not re.fullmatch(r"\..+\.tmp\d+", name):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        gone.append(name)
    return gone


# ----------------------------------------------------------------------------- is a checkpoint whole?


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files are missing, torn, empty or hold non-finite values: `--resume latest`
    steps back past it to an older one; named explicitly, it is refused in one line."""


def _check_safetensors(file: str) -> None:
    """A whole safetensors file: its size is the one its header gives, every float tensor is finite.
    The tensors are read one at a time (never the whole model at once)."""
    if not os.path.isfile(file):
        raise CorruptCheckpoint(f"{file} is missing")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        raw = f.read(n) if 0 < n <= min(100 * 2**20, size - 8) else b""  # safetensors caps headers at 100 MB
    try:
        header = json.loads(raw)
        end = max([0] + [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        what = "empty" if size == 0 else "not a readable safetensors file (no valid header)"
        raise CorruptCheckpoint(f"{file} is {what}") from None
    if size != 8 + n + end:
        raise CorruptCheckpoint(f"{file} is truncated or torn: {size} bytes, its header says {8 + n + end}")
    try:
        with safe_open(file, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
                t = f.get_tensor(k)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CorruptCheckpoint(f"{file} holds non-finite values (NaN/Inf) in {k}")
    except SafetensorError as e:
        raise CorruptCheckpoint(f"{file} is not a readable safetensors file ({e})") from None


def _nonfinite(obj, where: str = "") -> str | None:
    """The path of the first float tensor with NaN/Inf values inside nested dicts / lists, or None."""
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _nonfinite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


def check_checkpoint(path: str, train_state: dict) -> None:
    """Raise CorruptCheckpoint unless the checkpoint directory `path` can be trained on: its weights
    file whole and finite, its (already loaded) train state finite, so that a resumed run can save."""
    _check_safetensors(os.path.join(path, "model.safetensors"))
    bad = _nonfinite(train_state)
    if bad is not None:
        raise CorruptCheckpoint(f"{os.path.join(path, 'train_state.pt')} holds non-finite values (NaN/Inf) in {bad}")


def older_checkpoints(path: str) -> list[str]:
    """The step directories beside checkpoint `path` that are older than it, newest first."""
    root, name = os.path.split(os.path.normpath(path))
    return [os.path.join(root, d) for d in reversed(_step_dirs(root)) if d < name]


# ----------------------------------------------------------------------------- the run lock, the resolver


def _regular_file_or_absent(path: str, what: str) -> bool:
    """Whether `path` exists; ValueError when it is anything but a regular file (a link, a FIFO, a
    device, a directory): such a file is never opened, so it can neither block nor be written through."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ValueError(f"{what} {path} is {kind}: remove it")
    return True


POINTER_BYTES = 64  # "step_00000012\n" and room to spare; a pointer is never read further


def read_pointer(pointer: str) -> str:
    """The checkpoint directory name in a `latest` pointer: a regular file (never a link), of which
    at most POINTER_BYTES are read; its content is never echoed (it may be any file)."""
    if not _regular_file_or_absent(pointer, "the checkpoint pointer"):
        raise FileNotFoundError(f"no checkpoint pointer {pointer}")
    try:
        fd = os.open(pointer, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"the checkpoint pointer {pointer} cannot be opened ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped in after the check above
            raise ValueError(f"the checkpoint pointer {pointer} is not a regular file: remove it")
        raw = os.read(fd, POINTER_BYTES + 1)
    finally:
        os.close(fd)
    return _pointer_name(raw, pointer)


def _pointer_name(raw: bytes, pointer: str) -> str:
    name = raw.decode("ascii", errors="replace").strip()
    if len(raw) > POINTER_BYTES or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise ValueError(f"{pointer} holds something that is not a checkpoint directory beside it (not shown)")
    return name


class LockBusy(ValueError):
    """Another live process holds the lock."""


# what a lock file of ours holds: shown in messages; anything else in the file is not shown
_HOLDER = re.compile(r"pid \d+ on [\w.-]{1,100} since [\w: ]{1,40}")


class RunLock:
    """OUT/.lock: one run per output directory. A POSIX record lock (fcntl.lockf) on the file, so
    the kernel drops it when the holder dies however it dies (a SIGKILL'd run leaves a stale file,
    never a stale lock), and forked data-loader workers do not inherit it. The file is a regular
    file of its own, never a link: the lock writes into it."""

    def __init__(self, out: str):
        # a remote --out: the lock is the staging directory's (one per --out and machine), and OUT/.lock
        # on the store records the holder, best effort: a store cannot lock (docs/reliability.md)
        self.remote = os.path.join(out, ".lock") if storage.is_remote(out) else None
        self.path = os.path.join(staging_dir(out) if self.remote else out, ".lock")
        self.fd = None
        self.recorded = False  # our record is in OUT/.lock on the store
        self.previous = ""  # holder recorded in a stale lock file that was taken over

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _regular_file_or_absent(self.path, "the lock file")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:  # ELOOP: a link swapped in after the check above
            raise ValueError(f"the lock file {self.path} cannot be opened ({e.strerror}): remove it") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link would be written through
                raise ValueError(f"the lock file {self.path} is not a regular file of its own: remove it")
            raw = os.read(fd, 200).decode(errors="replace").strip()
            holder = raw if _HOLDER.fullmatch(raw) else "an unrecognised record, not shown" if raw else ""
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise LockBusy(
                    f"{os.path.dirname(self.path)} is in use by another run ({holder or 'unknown'}); "
                    "stop it, or train into another --out"
                ) from None
        except BaseException:
            os.close(fd)
            raise
        self.previous = holder
        record = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self.fd = fd
        if self.remote:
            try:
                self._record_on_store(record)
            except BaseException:
                self.release()
                raise
        return self

    def _record_on_store(self, record: str):
        """OUT/.lock on the store: the holder before us (a run that ended without releasing it: killed,
        preempted, or still going on another machine) is said; ours is written. Also the first write
        into --out, so that a store refusing writes fails here, before the first step."""
        try:
            raw = storage.read_bytes(self.remote, 200) if storage.exists(self.remote) else b""
            storage.write_bytes_atomic(self.remote, record.encode())
        except ValueError:  # over 200 bytes: not ours
            raw = b"?"
            storage.write_bytes_atomic(self.remote, record.encode())
        except OSError as e:
            raise ValueError(f"--out cannot be written: {e}") from None
        self.recorded = True
        text = raw.decode(errors="replace").strip()
        if text:
            holder = text if _HOLDER.fullmatch(text) else "an unrecognised record, not shown"
            self.previous = f"{holder}, recorded in {self.remote}; if that run still goes on, stop one of the two"

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):  # a clean end records no holder: nothing to take over
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the lock; the empty file stays (harmless)
            self.fd = None
            if self.recorded:
                with contextlib.suppress(OSError):
                    storage.remove(self.remote)
                self.recorded = False


def resolve_checkpoint(path: str, weights_only: bool = False) -> str:
    """The one resolver of checkpoint paths: a file is returned as is; a checkpoint directory (one
    holding model.safetensors) as is; a run directory, its checkpoints/ directory or the
    checkpoints/latest pointer file itself -> the checkpoint it names, a directory beside it. A URL
    (s3://, gs://, http(s)://) is resolved the same way on the store and downloaded (fetch_checkpoint):
    the local copy is returned; weights_only: only its model.safetensors."""
    path = os.fspath(path)
    if storage.is_remote(path):
        return fetch_checkpoint(path, weights_only)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.basename(os.path.normpath(path)) == "latest" and not os.path.isdir(path):
        pointers = [path]  # the pointer file itself (read_pointer refuses a link or a device)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    elif not os.path.isdir(path) or os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    else:
        pointers = [os.path.join(path, "latest"), os.path.join(path, "checkpoints", "latest")]
    for pointer in pointers:
        if os.path.lexists(pointer):
            name = read_pointer(pointer)
            target = os.path.join(os.path.dirname(os.path.abspath(pointer)), name)
            if not os.path.isdir(target):
                raise FileNotFoundError(f"{pointer} names {name}, which does not exist")
            return target
    raise FileNotFoundError(f"no model.safetensors (or checkpoints/latest) in directory {path}")


# ----------------------------------------------------------------------------- checkpoints on an object store
#
# An object store has no rename, so a checkpoint cannot appear at once. It is written whole to a local
# staging directory first (as above), its files are uploaded to ROOT/NAME/, each checked by its size on
# the store, then ROOT/NAME/manifest.json (every file's size and SHA-256) is uploaded and read back, and
# only then ROOT/latest is written: the pointer is the commit. A checkpoint without its manifest is an
# upload cut short: never named by `latest`, never resumed from, pruned later. A download is checked
# against the manifest before anything is loaded.

MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("model.safetensors", "train_state.pt", "meta.json")
MANIFEST_BYTES = 1 << 16
# fault injection for the tests: SIGKILL this process right after uploading NAME/FILE (a kill mid-save)
KILL_AFTER_UPLOAD = "CLIPA_TEST_KILL_AFTER_UPLOAD"


class IncompleteUpload(CorruptCheckpoint):
    """A checkpoint on a store without its manifest: its upload was cut short."""


def staging_dir(out: str) -> str:
    """The local directory in which a run into the remote --out `out` writes its checkpoints and logs
    before they are uploaded, and holds its run lock: $CLIPA_STAGING (default: the system's temporary
    directory)/clipa-<hash of out>, so that two runs into one --out on one machine meet at the lock."""
    digest = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(os.environ.get("CLIPA_STAGING") or tempfile.gettempdir(), f"clipa-{digest}")


def _digest(file: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _remote_size(url: str) -> int:
    with storage.open_read(url) as f:  # opening asks for the length only: no byte of the body is read
        return f.size()


def remote_step_dirs(root: str) -> list[str]:
    """The step_NNNNNNNN prefixes under the store prefix `root`, oldest first (complete or not)."""
    try:
        names = storage.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(d for d in names if re.fullmatch(r"step_\d{8}", d))


def read_remote_pointer(pointer: str) -> str | None:
    """The checkpoint name in the `latest` object on a store, None when there is none; at most
    POINTER_BYTES are read and the content is never echoed."""
    if not storage.exists(pointer):
        return None
    try:
        raw = storage.read_bytes(pointer, POINTER_BYTES)
    except ValueError:
        raw = b"x" * (POINTER_BYTES + 1)
    return _pointer_name(raw, pointer)


def _read_manifest(url: str) -> dict:
    """{file: {"size", "sha256"}} of the checkpoint at `url`; IncompleteUpload when it has no manifest."""
    where = os.path.join(url, MANIFEST)
    try:
        raw = storage.read_bytes(where, MANIFEST_BYTES)
    except FileNotFoundError:
        raise IncompleteUpload(f"{url} is incomplete (no {MANIFEST}: its upload was cut short)") from None
    except ValueError:
        raise CorruptCheckpoint(f"{where} is not a checkpoint manifest (over {MANIFEST_BYTES} bytes)") from None
    try:
        files = json.loads(raw)["files"]
        ok = isinstance(files, dict) and all(
            f in CHECKPOINT_FILES and isinstance(v["size"], int) and re.fullmatch(r"[0-9a-f]{64}", v["sha256"])
            for f, v in files.items()
        )
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok or "model.safetensors" not in files:
        raise CorruptCheckpoint(f"{where} is not a checkpoint manifest (not shown)")
    return files


def _kill_point(name: str, file: str):
    if os.environ.get(KILL_AFTER_UPLOAD) == f"{name}/{file}":
        os.kill(os.getpid(), signal.SIGKILL)


def publish_checkpoint(local_dir: str, root: str, *, keep: int, protected=()) -> str:
    """Upload the complete local checkpoint directory `local_dir` to ROOT/NAME/, verify it, then point
    ROOT/latest at it, then delete the step prefixes up to NAME beyond the newest `keep` (never NAME,
    never `protected`, never one newer than NAME). Returns ROOT/NAME. OSError when the store fails:
    `latest` then still names the previous complete checkpoint."""
    name = os.path.basename(os.path.normpath(local_dir))
    url = os.path.join(root, name)
    pointer = os.path.join(root, "latest")
    if read_remote_pointer(pointer) == name:
        # re-saving what `latest` names (after resuming an older one): point it at an older complete
        # checkpoint first, so that a kill during the upload never leaves it naming a half one
        older = [d for d in remote_step_dirs(root) if d < name]
        if older:
            storage.write_bytes_atomic(pointer, (older[-1] + "\n").encode())
        else:
            storage.remove(pointer)
    storage.remove(os.path.join(url, MANIFEST))  # an earlier upload's: NAME is incomplete until the new one
    files = {}
    for f in CHECKPOINT_FILES:
        src = os.path.join(local_dir, f)
        if not os.path.isfile(src):
            continue
        files[f] = _digest(src)
        storage.upload(src, os.path.join(url, f))
        got = _remote_size(os.path.join(url, f))
        if got != files[f]["size"]:
            raise OSError(f"{os.path.join(url, f)}: {got} bytes on the store, {files[f]['size']} written")
        _kill_point(name, f)
    manifest = json.dumps({"files": files}, indent=1).encode()
    storage.write_bytes_atomic(os.path.join(url, MANIFEST), manifest)
    if storage.read_bytes(os.path.join(url, MANIFEST), MANIFEST_BYTES) != manifest:
        raise OSError(f"{os.path.join(url, MANIFEST)}: read back different from what was written")
    _kill_point(name, MANIFEST)
    storage.write_bytes_atomic(pointer, (name + "\n").encode())
    for d in [d for d in remote_step_dirs(root) if d <= name][:-keep]:
        if d != name and d not in protected:
            storage.remove(os.path.join(root, d), recursive=True)
    return url


def download_checkpoint(url: str, dest: str, *, manifest: bool, weights_only: bool = False) -> str:
    """The checkpoint directory `url` copied to the local directory `dest` (atomic), every file checked
    against its manifest (sizes before the download, SHA-256 after). manifest=True (a run's own remote
    --out): a checkpoint without one is IncompleteUpload; False: a checkpoint copied there by other tools
    may have none, and is then checked only as a local one is. Returns dest."""
    files = None
    if manifest or storage.exists(os.path.join(url, MANIFEST)):
        files = _read_manifest(url)
    names = [f for f in CHECKPOINT_FILES if not weights_only or f == "model.safetensors"]
    if files is not None:
        names = [f for f in names if f in files]
    else:
        names = [f for f in names if f == "model.safetensors" or storage.exists(os.path.join(url, f))]

    def fill(d):
        for f in names:
            src = os.path.join(url, f)
            if files is not None:
                got = _remote_size(src)
                if got != files[f]["size"]:
                    raise CorruptCheckpoint(f"{src} is {got} bytes, its manifest says {files[f]['size']}")
            storage.download(src, os.path.join(d, f))
            if files is not None and _digest(os.path.join(d, f)) != files[f]:
                raise CorruptCheckpoint(f"{src} differs from its manifest (SHA-256)")

    return atomic_dir(dest, fill)


_FETCHED: dict[tuple, str] = {}
_CACHE: list[str] = []  # this process's download directory, removed when it exits


def download_dir() -> str:
    """This process's directory for downloaded checkpoints (removed when it exits)."""
    if not _CACHE or not _CACHE[0].endswith(f"-{os.getpid()}"):
        base = os.environ.get("CLIPA_STAGING") or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        d = tempfile.mkdtemp(prefix="clipa-fetch-", suffix=f"-{os.getpid()}", dir=base)
        _CACHE[:] = [d]
        atexit.register(lambda: os.getpid() == int(d.rsplit("-", 1)[1]) and shutil.rmtree(d, ignore_errors=True))
    return _CACHE[0]


def fetch_checkpoint(url: str, weights_only: bool = False) -> str:
    """resolve_checkpoint for a URL (s3://, gs://, http(s)://): the checkpoint it names (a weights file; a
    checkpoint directory; a run directory, its checkpoints/ or the latest pointer -> the checkpoint that
    names) downloaded once per process to a local temporary directory. Returns the local path."""
    storage.check_supported(url)
    if storage.scheme(url) == "pipe":
        raise ValueError(f"{url}: a checkpoint is read from a path or a URL, not from a pipe: command")
    url = url.rstrip("/")
    key = (url, weights_only)
    if key in _FETCHED:
        return _FETCHED[key]
    target = None
    if os.path.basename(url) == "latest":
        pointers = [url]
    elif storage.exists(os.path.join(url, "model.safetensors")):
        target, pointers = url, []
    else:
        pointers = [os.path.join(url, "latest"), os.path.join(url, "checkpoints", "latest")]
    for pointer in pointers:
        if storage.exists(pointer):
            target = os.path.join(os.path.dirname(pointer), read_remote_pointer(pointer))
            break
    dest = os.path.join(download_dir(), f"{len(_FETCHED)}")
    if target is not None:
        local = download_checkpoint(target, dest, manifest=False, weights_only=weights_only)
    elif storage.isfile(url) and os.path.basename(url) != "latest":
        name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(url)) or "weights"
        local = os.path.join(dest, name)
        storage.download(url, local)
    else:
        raise FileNotFoundError(f"checkpoint not found: {url}")
    _FETCHED[key] = local
    return local
