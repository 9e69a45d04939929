"""Where the project's files live: the one place that opens, lists and writes paths that may be remote.

Paths (docs/data.md):
  PATH, file://PATH   the local file system; only regular files are opened for reading, so that a FIFO
                      or a device never blocks a reader
  s3://BUCKET/KEY     S3 or any S3-compatible store (s3fs): the endpoint from the standard AWS_ENDPOINT_URL
                      (or AWS_ENDPOINT_URL_S3), credentials from the standard AWS chain
  gs://BUCKET/KEY     Google Cloud Storage (gcsfs): the default Google credentials; STORAGE_EMULATOR_HOST
                      points it at an emulator (anonymous, as emulators take no credentials)
  http(s)://URL       read only (fsspec's HTTP), one streamed GET per open, retried on transient errors
  pipe:COMMAND        read only: the shell command's stdout, webdataset's convention (`pipe:aws s3 cp
                      s3://b/x.tar -`); a command that exits non-zero fails the stream when it ends
Any other `SCHEME://` is refused in one line (ValueError), never taken for a local directory named `gs:`.
os.path.join / dirname / basename work on these URLs as on local paths.

Errors a user can cause (a missing object or bucket, wrong or missing credentials, a 403, an unreachable
endpoint, a stalled stream) come out of every function here, and out of the reads of an open file, as
one-line OSErrors naming the URL and the cause: FileNotFoundError, PermissionError, ConnectionError,
TimeoutError or OSError, so that callers catch OSError alone whatever library did the I/O. The cause is
the library's first line, cut short: no file content and no server response body is ever shown.
Object stores are reached through fsspec with s3fs / gcsfs (the libraries img2dataset and the Hugging
Face stack use); they are imported when a path first needs them, so a local run never loads them.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import io
import logging
import os
import re
import select
import shutil
import signal
import stat
import string
import subprocess
import time

import braceexpand
import fsspec

# the most names one brace pattern may expand to (counted before any is made): 3x DataComp's 12.8B pool
# in img2dataset's 10k-sample shards, ~400 MB of names
MAX_NAMES = 1 << 22
# seconds a connection, a read or a piped command may go without a byte before the read fails: a dead
# endpoint or a hung command is then an error, never a hang
TIMEOUT = 60.0
# transient failures (connection refused or reset, 408/429/5xx, a timeout) are tried this many times in
# all: a store that restarts or throttles is waited for, a dead one fails within a bounded time. http(s):
# after RETRY_DELAY seconds doubling each time, never past RETRY_SECONDS; S3: botocore's jittered
# back-off; GCS: gcsfs's own policy (6 tries, about 30 s)
RETRIES = 5
RETRY_DELAY = 0.5
RETRY_SECONDS = 60.0
# object stores are read in ranged GETs of this size, read ahead (one request per 8 MiB of a shard)
READ_BLOCK = 8 << 20
BUFFER = 1 << 20  # bytes buffered per open file

STORES = ("s3", "gs", "gcs")
READ_ONLY = ("http", "https", "pipe")
SCHEMES = ("", "file", *STORES, *READ_ONLY)
_LETTERS = string.ascii_uppercase + string.ascii_lowercase  # braceexpand's letter ranges
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB = re.compile(r"[*?\[]")
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# programming errors pass through untranslated: they are bugs, never an unreadable file
_BUGS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError, RecursionError, MemoryError)

log = logging.getLogger("clipa.storage")


# ----------------------------------------------------------------------------- schemes


def scheme(path) -> str:
    """'' for a local path, 'pipe' for pipe:COMMAND, else the URL's scheme in lower case ('s3', 'gs',
    'http', 'file', ...)."""
    path = os.fspath(path)
    if path.startswith("pipe:"):
        return "pipe"
    m = _URL.match(path)
    return m.group(1).lower() if m else ""


def is_remote(path) -> bool:
    """Whether `path` is read through something other than the local file system."""
    return scheme(path) not in ("", "file")


def local_path(path) -> str:
    """The local file system path of a local path or a file:// URL."""
    path = os.fspath(path)
    return path[len("file://") :] if scheme(path) == "file" else path


def check_supported(path) -> str:
    """`path`, or ValueError (one line) for a scheme we do not read, or a local path that is a URL with
    a slash missing (`gs:/bucket` would otherwise become a local directory named `gs:`)."""
    path = os.fspath(path)
    s = scheme(path)
    if s not in SCHEMES:
        raise ValueError(
            f"unsupported storage scheme {s}:// in {path} (use a local path, s3://, gs://, http(s):// or pipe:COMMAND)"
        )
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/", path)
    if not s and m:
        raise ValueError(f"{path} is neither a local path nor a URL: did you mean {m.group(1)}://...?")
    return path


def _writable(path: str) -> str:
    check_supported(path)
    if scheme(path) in READ_ONLY:
        raise ValueError(f"cannot write to {path}: {scheme(path)}: is read only (use a local path, s3:// or gs://)")
    return path


# ----------------------------------------------------------------------------- one-line errors


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def _names(e: BaseException) -> set[str]:
    """The class names in the exception's MRO: matched by name so that botocore, aiohttp and google
    errors are told apart without importing those libraries."""
    return {c.__name__ for c in type(e).__mro__}


def _status(e: BaseException) -> int | None:
    """The HTTP status behind an exception from aiohttp, gcsfs or botocore, when there is one."""
    for attr in ("status", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        v = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return v if isinstance(v, int) else None
    return None


def _oneline(url: str, e: BaseException) -> OSError:
    """A one-line OSError naming `url` and the cause of `e` (any library's exception)."""
    names = _names(e)
    status = _status(e)
    msg = _first_line(e)
    detail = "" if msg in url or url.endswith(msg) else f" ({msg})"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return PermissionError(
            f"{url}: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if "DefaultCredentialsError" in names or "RefreshError" in names:
        return PermissionError(f"{url}: no usable Google credentials{detail} (see GOOGLE_APPLICATION_CREDENTIALS)")
    if isinstance(e, FileNotFoundError) or status == 404:
        # a sentence says which is missing (S3: "The specified bucket does not exist"); a bare path does not
        return FileNotFoundError(f"{url}: not found{detail if ' ' in msg else ''}")
    if isinstance(e, PermissionError) or status in (401, 403) or msg.startswith("Forbidden"):
        return PermissionError(f"{url}: access denied{detail}: check the credentials and the bucket's permissions")
    if isinstance(e, TimeoutError) or "Timeout" in " ".join(names):
        return TimeoutError(f"{url}: timed out{detail}")
    if isinstance(e, ConnectionError) or names & {"ConnectionError", "ClientConnectionError", "HTTPClientError"}:
        return ConnectionError(f"{url}: cannot reach the server{detail}")
    if status is not None:
        return OSError(f"{url}: HTTP {status}{detail}")
    if isinstance(e, IsADirectoryError):
        return IsADirectoryError(f"{url}: is a directory")
    if isinstance(e, OSError) and e.strerror:
        return type(e)(f"{url}: {e.strerror}") if type(e).__module__ == "builtins" else OSError(f"{url}: {e.strerror}")
    return OSError(f"{url}: {type(e).__name__}{detail}")


def _transient(e: BaseException) -> bool:
    """Worth retrying: the server may answer next time (throttled, restarting, a dropped connection)."""
    if isinstance(e, (FileNotFoundError, PermissionError)):
        return False
    status = _status(e)
    if status is not None:
        return status in _TRANSIENT_STATUS
    names = _names(e)
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(
        names & {"ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError"}
    )


@contextlib.contextmanager
def _errors(url: str):
    """Whatever the I/O inside raises, out comes a one-line OSError naming `url` (bugs excepted)."""
    try:
        yield
    except _BUGS:
        raise
    except Exception as e:
        if getattr(e, "storage_oneline", False):  # made here already (a nested call)
            raise
        raise _mark(_oneline(url, e)) from None


def _mark(e: OSError) -> OSError:
    """`e`, marked as one line made here: an outer _errors passes it on as it is."""
    e.storage_oneline = True
    return e


# ----------------------------------------------------------------------------- the file systems

_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}
# what a store's client reads from the environment: a change (a test, a re-configured run) makes a new one
_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


class _NoTraceback(logging.Filter):
    """gcsfs logs a traceback for every request that runs out of retries: the caller gets the error as
    one line, so the log keeps the line and drops the traceback."""

    def filter(self, record):
        record.exc_info = None
        record.exc_text = None
        return True


def _filesystem(s: str) -> fsspec.AbstractFileSystem:
    """The fsspec file system of scheme `s`, one per process (a forked loader worker makes its own: an
    async client does not survive fork) and per configuration (the environment, the timeouts)."""
    key = (s, os.getpid(), TIMEOUT, RETRIES, *(os.environ.get(k) for k in _ENV))
    fs = _FILESYSTEMS.get(key)
    if fs is not None:
        return fs
    if s == "s3":
        import s3fs

        # botocore takes the endpoint from AWS_ENDPOINT_URL(_S3) and the credentials from the AWS chain, and
        # retries throttling, 5xx and connection errors with jittered exponential back-off
        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            use_listings_cache=False,  # another rank or run may have written since: always ask
            config_kwargs={
                "connect_timeout": min(TIMEOUT, 10.0),
                "read_timeout": TIMEOUT,
                "retries": {"max_attempts": RETRIES, "mode": "standard"},
            },
        )
        fs.retries = 2  # s3fs's own retries, for a body cut off mid-read (botocore retries the requests)
    elif s in ("gs", "gcs"):
        import gcsfs.core

        gcsfs_log = logging.getLogger("gcsfs")
        if not any(isinstance(f, _NoTraceback) for f in gcsfs_log.filters):
            gcsfs_log.addFilter(_NoTraceback())
        emulator = bool(os.environ.get("STORAGE_EMULATOR_HOST"))
        # the plain client: gcsfs's default one first asks a gRPC control API for the bucket's layout,
        # which an emulator does not serve (a minute's timeout per bucket)
        fs = gcsfs.core.GCSFileSystem(
            skip_instance_cache=True,
            token="anon" if emulator else None,
            requests_timeout=TIMEOUT,
            cache_timeout=0,  # no listing cache: another rank or run may have written since
        )  # gcsfs retries transient errors itself: 6 tries, about 30 s of back-off in all
    elif s in ("http", "https"):
        from fsspec.implementations.http import HTTPFileSystem

        fs = HTTPFileSystem(skip_instance_cache=True)
    else:
        raise ValueError(f"no file system for {s}://")
    for old in [k for k in _FILESYSTEMS if k[0] == s or k[1] != os.getpid()]:
        del _FILESYSTEMS[old]  # one configuration per scheme: an old one's connections are let go
    _FILESYSTEMS[key] = fs
    return fs


def _store_path(path: str) -> str:
    """`path` as its file system names it: gcs:// written as gs:// (fsspec takes both)."""
    return "gs://" + path[len("gcs://") :] if scheme(path) == "gcs" else path


def _with_scheme(path: str, s: str) -> str:
    """A path an fsspec listing returned ('bucket/key') as the URL a user writes ('s3://bucket/key')."""
    return path if "://" in path else f"{s}://{path}"


# ----------------------------------------------------------------------------- reading


class _Stream(io.RawIOBase):
    """A remote or piped byte stream as a raw file: read errors of any library come out as one-line
    OSErrors naming the URL; a stream that cannot seek still skips forward (reading and dropping the
    bytes), as the tar reader does past an oversized member; size() is the length when it is known."""

    def __init__(self, url: str, inner, size: int | None = None, can_seek: bool = False):
        self.url = url
        self._inner = inner
        self._size = size
        self._pos = 0
        self._can_seek = can_seek

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # forward relative seeks always work; others only where the store can seek

    def size(self) -> int:
        if self._size is None:
            raise io.UnsupportedOperation(f"{self.url}: length unknown")
        return self._size

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        with _errors(self.url):
            data = self._inner.read(len(b))
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        if self._can_seek:
            with _errors(self.url):
                self._pos = self._inner.seek(offset, whence)
            return self._pos
        if whence == 0:
            offset -= self._pos
        elif whence != 1:
            raise io.UnsupportedOperation(f"{self.url}: cannot seek from the end of a stream")
        if offset < 0:
            raise io.UnsupportedOperation(f"{self.url}: cannot seek back in a stream")
        buf = bytearray(min(offset, BUFFER))
        while offset > 0:
            n = self.readinto(memoryview(buf)[: min(offset, len(buf))])
            if not n:
                break
            offset -= n
        return self._pos

    def close(self):
        if not self.closed:
            try:
                with _errors(self.url):
                    self._inner.close()
            finally:
                super().close()


class _Buffered(io.BufferedReader):
    """A buffered stream (reads of n bytes return n until the end) that also tells its length."""

    def size(self) -> int:
        return self.raw.size()


class _Pipe:
    """pipe:COMMAND's stdout. The command runs in a session of its own, so that closing the stream early
    ends it and whatever it started; at the end of its output its exit status decides: non-zero is an
    error (the stream may be cut short). A command silent for `timeout` seconds is an error too."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self.proc = subprocess.Popen(
            url[len("pipe:") :],
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.ended = False

    def read(self, n: int) -> bytes:
        if self.ended:
            return b""
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise _mark(TimeoutError(f"{self.url}: no output for {self.timeout:g} s"))
        data = os.read(self.fd, n)
        if not data:
            self.ended = True
            try:
                rc = self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise _mark(TimeoutError(f"{self.url}: closed its output but did not exit")) from None
            if rc != 0:
                raise _mark(OSError(f"{self.url}: the command exited with status {rc}"))
        return data

    def close(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stdout.close()


def _open_local(path: str):
    """A local regular file: checked with stat() before opening, and again on the open file (opened
    non-blocking, so that a FIFO swapped in meanwhile cannot block it); a FIFO's open() would otherwise
    wait for a writer, a device's reads never end."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path}: not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=BUFFER)
    except BaseException:
        os.close(fd)
        raise


def _local_errors(path: str, e: OSError) -> OSError:
    if e.strerror is None:  # ours, already one line
        return e
    return type(e)(e.errno, e.strerror, path)


def _retrying(url: str, attempt):
    """attempt() until it succeeds, retrying transient failures (RETRIES, RETRY_DELAY, RETRY_SECONDS)."""
    deadline = time.monotonic() + RETRY_SECONDS
    delay = RETRY_DELAY
    for i in range(RETRIES):
        try:
            return attempt()
        except _BUGS:
            raise
        except Exception as e:
            if i == RETRIES - 1 or not _transient(e) or time.monotonic() + delay > deadline:
                raise
            log.info("%s: %s; retrying in %.1f s", url, _first_line(e), delay)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _open_http(url: str, timeout: float) -> _Stream:
    import aiohttp
    from fsspec.asyn import sync
    from fsspec.implementations.http import HTTPStreamFile

    fs = _filesystem(scheme(url))
    limits = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10.0), sock_read=timeout)

    def attempt():
        # one streamed GET (fs.open would first ask the size with another request)
        session = sync(fs.loop, fs.set_session)
        return HTTPStreamFile(fs, url, mode="rb", loop=fs.loop, session=session, timeout=limits)

    f = _retrying(url, attempt)
    # the length, when the body is sent as is (a compressed body is longer once decoded)
    size = f.r.content_length if f.r.headers.get("Content-Encoding", "identity") == "identity" else None
    return _Stream(url, f, size)


def open_read(path, timeout: float | None = None):
    """A binary file for reading `path` (any scheme): read(n) returns n bytes until the end, seek(n, 1)
    skips forward, size() is the length when known. Local: only a regular file. http(s): one streamed
    GET, retried on transient errors. s3 / gs: ranged GETs of READ_BLOCK bytes read ahead, retried by
    s3fs / gcsfs. pipe: the command's stdout. A stream with no byte for `timeout` s (TIMEOUT) fails."""
    path = check_supported(os.fspath(path))
    timeout = TIMEOUT if timeout is None else timeout
    s = scheme(path)
    if s in ("", "file"):
        p = local_path(path)
        try:
            return _open_local(p)
        except OSError as e:
            raise _local_errors(p, e) from None
    if s == "pipe":
        with _errors(path):
            return _Buffered(_Stream(path, _Pipe(path, timeout)), BUFFER)
    if s in ("http", "https"):
        with _errors(path):
            return _Buffered(_open_http(path, timeout), BUFFER)
    with _errors(path):
        f = _filesystem(s).open(_store_path(path), "rb", block_size=READ_BLOCK, cache_type="readahead")
        return _Buffered(_Stream(path, f, int(f.size), can_seek=True), BUFFER)


def read_bytes(path, max_bytes: int) -> bytes:
    """At most `max_bytes` of `path`; ValueError (content not shown) when it holds more. For small files
    whose size is not trusted (a pointer, a JSON record): nothing beyond max_bytes + 1 is read."""
    with open_read(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is over {max_bytes:,} bytes (not shown)")
    return data


def read_text(path, max_bytes: int) -> str:
    """read_bytes as UTF-8 text; ValueError (content not shown) when it is not UTF-8."""
    try:
        return read_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (not shown)") from None


# ----------------------------------------------------------------------------- names and listings


def expand_braces(pattern: str, limit: int = MAX_NAMES) -> list[str]:
    """`a{000..002}b{x,y}` -> 6 names, as webdataset expands a URL (the braceexpand library: numeric and
    letter ranges with an optional step, zero padding, nesting, backslash escapes). ValueError (one line)
    for unbalanced braces, or when the pattern names more than `limit`: counted from the pattern before
    any name is made, so a typo like {0..99999999999} costs nothing."""
    n = _brace_count(pattern)
    if n > limit:
        raise ValueError(f"{pattern!r} expands to more than {limit:,} names")
    return list(braceexpand.braceexpand(pattern))


def _brace_count(pattern: str) -> int:
    """How many names braceexpand makes of `pattern`: its parse (parse_pattern), counting instead of
    generating (a product over the pattern's brace groups)."""
    total, depth, start, pos = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                total *= _brace_group_count(pattern[start + 1 : pos])
        pos += 1
    if depth != 0:
        raise ValueError(f"unbalanced braces in {pattern!r} (a literal brace is written \\{{ or \\}})")
    return total


def _brace_group_count(body: str) -> int:
    """Names of one brace group's body: a range, a comma list (each item a pattern), else a literal
    {body} around a pattern (braceexpand's parse_expression)."""
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?", body) or re.fullmatch(
        r"([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?", body
    )
    if m:
        step = int(m.group(3) or 1) or 1
        a, b = (int(x) if x.lstrip("-").isdigit() else _LETTERS.index(x) for x in m.group(1, 2))
        if m.group(1).isalpha() and a > b:
            return len(_LETTERS[a : (b or -len(_LETTERS)) - 1 : -step])
        return len(range(a, b + 1, step) if a < b else range(a, b - 1, -step))
    items, depth, start, pos = [], 0, 0, 0
    while pos < len(body):
        c = body[pos]
        if c == "\\":
            pos += 2
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            items.append(body[start:pos])
            start = pos + 1
        pos += 1
    if depth != 0 or not items:
        return _brace_count(body)
    return sum(_brace_count(item) for item in [*items, body[start:]])


def has_glob(path) -> bool:
    """Whether `path` holds glob characters that expand() matches: never in a pipe: command or an
    http(s) URL (a '?' there starts a query, and a web server cannot be listed)."""
    return scheme(path) not in READ_ONLY and bool(_GLOB.search(os.fspath(path)))


def glob(pattern: str) -> list[str]:
    """The paths matching a glob pattern, sorted, in the pattern's own scheme (s3://..., gs://...).
    FileNotFoundError when none does."""
    check_supported(pattern)
    s = scheme(pattern)
    if s in READ_ONLY:
        raise ValueError(f"{pattern}: {s}: cannot be listed: name the files (braces expand)")
    if s in ("", "file"):
        hits = sorted(globlib.glob(os.path.expanduser(local_path(pattern))))
        hits = ["file://" + h for h in hits] if s == "file" else hits
    else:
        with _errors(pattern):
            hits = sorted(_with_scheme(p, s) for p in _filesystem(s).glob(_store_path(pattern)))
    if not hits:
        raise FileNotFoundError(f"no files match {pattern}")
    return hits


def expand(spec: str, limit: int = MAX_NAMES) -> list[str]:
    """A pattern's names: braces expanded (at most `limit` names), then globs matched where the store can
    list (local, s3://, gs://). pipe: commands and http(s) URLs are brace-expanded only. Names without
    glob characters are returned as they are, whether or not they exist."""
    check_supported(spec)
    out: list[str] = []
    for name in expand_braces(spec, limit):
        out.extend(glob(name) if has_glob(name) else [name])
        if len(out) > limit:
            raise ValueError(f"{spec!r} names more than {limit:,} files")
    return out


def exists(path) -> bool:
    """Whether a file or directory (on a store: an object or a prefix holding objects; http(s): a URL that
    answers) is at `path`; a pipe: command is taken to exist (it cannot be asked without running it). An
    error other than absence (no credentials, an unreachable endpoint) raises, never reads as False."""
    path = check_supported(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        return os.path.exists(local_path(path))
    if s == "pipe":
        return True
    with _errors(path):
        fs = _filesystem(s)
        try:
            fs.info(_store_path(path))
            return True
        except FileNotFoundError:
            return False


def isfile(path) -> bool:
    """Whether `path` is a regular file (local) or an object (store)."""
    path = check_supported(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        return os.path.isfile(local_path(path))
    if s == "pipe":
        return True
    with _errors(path):
        try:
            return _filesystem(s).info(_store_path(path))["type"] == "file"
        except FileNotFoundError:
            return False


def isdir(path) -> bool:
    """Whether `path` is a directory (local) or a prefix holding objects (store; a bucket too)."""
    path = check_supported(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        return os.path.isdir(local_path(path))
    if s in READ_ONLY:
        return False
    with _errors(path):
        return _filesystem(s).isdir(_store_path(path).rstrip("/"))


def listdir(path) -> list[str]:
    """The names (not paths) in a directory or under a store prefix, sorted. FileNotFoundError when
    there is none."""
    path = check_supported(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        p = local_path(path)
        try:
            return sorted(os.listdir(p))
        except OSError as e:
            raise _local_errors(p, e) from None
    if s in READ_ONLY:
        raise ValueError(f"{path}: {s}: cannot be listed")
    with _errors(path):
        fs = _filesystem(s)
        prefix = _store_path(path).rstrip("/")
        return sorted({os.path.basename(p.rstrip("/")) for p in fs.ls(prefix, detail=False)} - {""})


def find(path, limit: int = MAX_NAMES) -> list[str]:
    """The files below a directory or store prefix, at any depth, as sorted paths relative to it ('a/b.jpg').
    FileNotFoundError when there is none; ValueError past `limit` files. Local: links are not followed
    into other directories (os.walk's default)."""
    path = check_supported(os.fspath(path))
    s = scheme(path)
    if s in READ_ONLY:
        raise ValueError(f"{path}: {s}: cannot be listed")
    if s in ("", "file"):
        root = local_path(path)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such directory")
        out = []
        for d, _, files in os.walk(root):
            out.extend(os.path.relpath(os.path.join(d, f), root) for f in files)
            if len(out) > limit:
                raise ValueError(f"{path} holds more than {limit:,} files")
        return sorted(out)
    with _errors(path):
        prefix = _store_path(path).rstrip("/")
        found = _filesystem(s).find(prefix)
    base = prefix.split("://", 1)[-1] + "/"
    out = sorted(p[len(base) :] for p in found if p.startswith(base))
    if not out:
        raise FileNotFoundError(f"{path}: nothing there")
    if len(out) > limit:
        raise ValueError(f"{path} holds more than {limit:,} files")
    return out


# ----------------------------------------------------------------------------- writing


def _bucket(path: str) -> str:
    return path.split("://", 1)[1].split("/", 1)[0]


def makedirs(path) -> None:
    """A local directory and its parents. On a store, where directories are only key prefixes, nothing is
    made; the bucket must exist (FileNotFoundError otherwise), so that a typo fails before any work."""
    path = _writable(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        os.makedirs(local_path(path), exist_ok=True)
        return
    url = f"{s}://{_bucket(path)}"
    if not exists(url):  # a wrong key raises here (PermissionError), never reads as a missing bucket
        raise FileNotFoundError(f"{url}: no such bucket (create it first)")


def _fsync_dir(path: str):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_local_atomic(path: str, write_fn) -> None:
    """write_fn(tmp) writes a temporary beside `path`, then fsync and rename over it: a reader, or a run
    resumed after a kill, sees the old file or the new one, never half of one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _fsync_dir(d)


def write_bytes_atomic(path, data: bytes) -> None:
    """`data` as the file `path`, whole or not at all. Local: a temporary, fsync, rename. Store: one PUT
    (an object appears only once all of it is stored; a large one as a multipart upload, which appears
    only when it completes)."""
    path = _writable(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        p = local_path(path)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        write_local_atomic(p, write)
        return
    with _errors(path):
        _filesystem(s).pipe_file(_store_path(path), bytes(data))


def upload(local_file: str, path) -> None:
    """Copy the local file `local_file` to `path`, whole or not at all (as write_bytes_atomic), streamed
    from disk: for checkpoint files too large to hold in memory twice."""
    path = _writable(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        write_local_atomic(local_path(path), lambda tmp: shutil.copyfile(local_file, tmp))
        return
    with _errors(path):
        _filesystem(s).put_file(local_file, _store_path(path))


def download(path, local_file: str) -> None:
    """Copy `path` (any scheme) to the local file `local_file`, written atomically: for readers that need
    a local file (safetensors maps it, TensorFlow opens it by name)."""

    def write(tmp):
        with open_read(path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, BUFFER)

    write_local_atomic(local_file, write)


def remove(path, recursive: bool = False) -> None:
    """Delete a file (or, recursive, a directory / every object under a prefix). Already gone is no error:
    pruning re-run after a kill finds some of its work done."""
    path = _writable(os.fspath(path))
    s = scheme(path)
    if s in ("", "file"):
        p = local_path(path)
        if recursive and os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        return
    with _errors(path):
        fs = _filesystem(s)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(_store_path(path).rstrip("/") if recursive else _store_path(path), recursive=recursive)
