"""storage.py: local paths, pipe: commands and real servers on loopback (moto's S3 server, the GCS
emulator, python -m http.server, tests/servers.py) read, listed and written through one API, and every
failure a user can cause comes out as one line naming the URL."""

import http.server
import multiprocessing
import os
import threading
import time

import braceexpand
import pytest
import servers

import storage

DATA = os.urandom(300_000)  # several READ_BLOCKs below: a read spans ranged GETs
PATTERNS = [
    "{a,b{1..2}}",
    "x{1..010}y",
    "{0..10}{-2..2}",
    "{x}{{a,b}}",
    "{a..e..2}{Z..W}{A..A}",
    "{1..7..3}{5..1}{01..10..3}",
    "{,x}{a,}",
    "a\\{1,2\\}b{3,4\\,5}",
    "{a,b}{c{d,e}f,g{1..3}}h",
    "pipe:awk '{print $1}' s3://b/{000..002}.tar",
]
SHARDS = [f"shards/{i:03d}.tar" for i in range(3)]


def _one_line(err: BaseException, url: str):
    text = str(err)
    assert "\n" not in text and url in text, text
    return text


@pytest.fixture
def small_blocks(monkeypatch):
    """Ranged GETs of 64 KiB and quick retries: a read spans several requests, a dead endpoint fails fast."""
    monkeypatch.setattr(storage, "READ_BLOCK", 1 << 16)
    monkeypatch.setattr(storage, "RETRY_DELAY", 0.05)
    monkeypatch.setattr(storage, "RETRIES", 3)


# ----------------------------------------------------------------------------- no server


def test_schemes():
    assert [storage.scheme(p) for p in ("a/b", "/a", "file:///a", "S3://b/k", "gs://b", "pipe:cat x")] == [
        "",
        "",
        "file",
        "s3",
        "gs",
        "pipe",
    ]
    assert storage.is_remote("s3://b/k") and storage.is_remote("pipe:cat x")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("runs/a:b")
    assert storage.check_supported("runs/x") == "runs/x"
    for bad in ("ftp://host/x.tar", "hdfs://nn/x", "gs:/bucket/run", "s3:/bucket/run"):
        with pytest.raises(ValueError) as e:
            storage.check_supported(bad)
        _one_line(e.value, bad)
    for read_only in ("http://127.0.0.1:1/x", "pipe:cat x"):
        with pytest.raises(ValueError, match="read only"):
            storage.write_bytes_atomic(read_only, b"x")
    with pytest.raises(ValueError, match="cannot be listed"):
        storage.glob("http://127.0.0.1:1/*.tar")


def test_brace_expansion_is_bounded_before_any_name_is_made():
    assert storage.expand_braces("a{000..002}b{x,y}") == ["a000bx", "a000by", "a001bx", "a001by", "a002bx", "a002by"]
    # webdataset's own expansion (braceexpand), each pattern counted exactly before it is expanded
    for pattern in PATTERNS:
        names = list(braceexpand.braceexpand(pattern))
        assert storage.expand_braces(pattern) == names
        assert storage._brace_count(pattern) == len(names), pattern
    with pytest.raises(ValueError, match="unbalanced braces"):
        storage.expand("s3://b/{000..002.tar")
    # pipe: commands and URLs are brace-expanded as webdataset expands them, never globbed
    assert storage.expand("pipe:curl -s http://h/{0..1}.tar?x=*") == [
        "pipe:curl -s http://h/0.tar?x=*",
        "pipe:curl -s http://h/1.tar?x=*",
    ]
    assert storage.expand("http://h/{8..10}.tar?download=1") == [f"http://h/{i}.tar?download=1" for i in (8, 9, 10)]
    t = time.monotonic()
    for pattern in ("s3://b/{0..99999}{0..99999}.tar", "{0..99999999999999}", "{a,b}" * 40):
        with pytest.raises(ValueError, match="more than 4,194,304 names") as e:
            storage.expand(pattern)
        assert "\n" not in str(e.value)
    assert time.monotonic() - t < 1
    with pytest.raises(ValueError, match="more than 5 names"):
        storage.expand_braces("{0..5}", limit=5)


def test_local_reads_only_regular_files(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(DATA)
    for p in (str(path), f"file://{path}"):
        with storage.open_read(p) as f:
            assert f.read() == DATA
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # open() of a FIFO waits for a writer: refused before it is opened
    t = time.monotonic()
    for p in (fifo, tmp_path, "/dev/zero"):
        with pytest.raises(OSError, match="not a regular file"):
            storage.open_read(p)
    assert time.monotonic() - t < 5
    with pytest.raises(FileNotFoundError) as e:
        storage.open_read(tmp_path / "missing.tar")
    assert str(tmp_path / "missing.tar") in str(e.value)
    assert storage.glob(str(tmp_path / "*.bin")) == [str(path)]
    with pytest.raises(FileNotFoundError, match="no files match"):
        storage.expand(str(tmp_path / "*.tar"))


def test_local_atomic_write_and_bounded_read(tmp_path):
    run = tmp_path / "run"
    storage.makedirs(run)
    storage.write_bytes_atomic(run / "latest", b"step_00000012\n")
    storage.write_bytes_atomic(run / "latest", b"step_00000024\n")  # replaced whole
    assert storage.read_text(run / "latest", 64) == "step_00000024\n"
    assert storage.listdir(run) == ["latest"]  # no temporary left behind
    storage.write_bytes_atomic(run / "big", b"SECRET" * 100)
    with pytest.raises(ValueError, match="over 64 bytes") as e:
        storage.read_text(run / "big", 64)
    assert "SECRET" not in str(e.value)
    storage.write_bytes_atomic(run / "bin", b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        storage.read_text(run / "bin", 64)
    storage.upload(str(run / "big"), str(run / "copy"))
    storage.download(str(run / "copy"), str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == b"SECRET" * 100
    storage.remove(run / "copy")
    storage.remove(run / "copy")  # already gone: no error
    storage.remove(run, recursive=True)
    assert not storage.exists(run)


# ----------------------------------------------------------------------------- pipe:


def test_pipe_reads_the_commands_output(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(DATA)
    with storage.open_read(f"pipe:cat {path}") as f:
        assert f.read(10) == DATA[:10]
        assert f.seek(1000, 1) == 1010  # a stream skips forward by reading
        assert f.read() == DATA[1010:]
    # closed early: the command (and what it started) is ended, not left running
    t = time.monotonic()
    with storage.open_read("pipe:yes | cat") as f:
        assert f.read(4) == b"y\ny\n"
    assert time.monotonic() - t < 5


def test_pipe_failures_are_one_line_at_the_end_or_on_a_stall(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(DATA)
    url = f"pipe:cat {path}; exit 3"
    with storage.open_read(url) as f:
        assert f.read(len(DATA)) == DATA  # everything it wrote is read
        with pytest.raises(OSError, match="exited with status 3") as e:
            f.read()
    _one_line(e.value, url)
    with pytest.raises(OSError, match="status 1"), storage.open_read("pipe:exit 1") as f:
        f.read()
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="no output for 0.5 s"), storage.open_read("pipe:sleep 30", 0.5) as f:
        f.read()
    assert time.monotonic() - t < 5


# ----------------------------------------------------------------------------- S3 (moto's server)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with servers.s3_server(str(tmp_path_factory.mktemp("s3"))) as server:
        client = servers.s3_client(server)
        for key in SHARDS:
            client.put_object(Bucket="clipa", Key=key, Body=DATA)
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch, small_blocks):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_s3_read_list_write(s3):
    with storage.open_read("s3://clipa/shards/001.tar") as f:
        assert f.size() == len(DATA)
        assert f.read(10) == DATA[:10]
        f.seek(100_000, 1)
        assert f.read() == DATA[100_010:]
    listed = [f"s3://clipa/{k}" for k in SHARDS]
    assert storage.expand("s3://clipa/shards/*.tar") == listed
    assert storage.expand("s3://clipa/shards/{000..002}.tar") == listed
    assert storage.listdir("s3://clipa/shards") == ["000.tar", "001.tar", "002.tar"]
    assert storage.isdir("s3://clipa/shards") and not storage.isdir("s3://clipa/shards/000.tar")
    assert storage.isfile("s3://clipa/shards/000.tar") and not storage.isfile("s3://clipa/shards/009.tar")
    assert storage.exists("s3://clipa/shards") and not storage.exists("s3://clipa/nothing")

    storage.makedirs("s3://clipa/run")  # the bucket exists: nothing to make
    storage.write_bytes_atomic("s3://clipa/run/latest", b"step_00000012\n")
    assert storage.read_text("s3://clipa/run/latest", 64) == "step_00000012\n"
    with pytest.raises(ValueError, match="over 4 bytes"):
        storage.read_text("s3://clipa/run/latest", 4)
    storage.upload(__file__, "s3://clipa/run/step_00000012/file")
    obj = servers.s3_client(s3).get_object(Bucket="clipa", Key="run/step_00000012/file")["Body"].read()
    with open(__file__, "rb") as f:
        assert obj == f.read()
    assert storage.listdir("s3://clipa/run") == ["latest", "step_00000012"]
    storage.remove("s3://clipa/run/step_00000012", recursive=True)
    storage.remove("s3://clipa/run/step_00000012", recursive=True)  # already gone: no error
    assert storage.listdir("s3://clipa/run") == ["latest"]


def _read_in_child(url, queue):
    with storage.open_read(url) as f:
        queue.put(f.read())


def test_s3_read_in_a_forked_worker(s3):
    """The loader's workers are forked from a process that has listed and read the store: each makes its
    own client (an async client does not survive fork)."""
    assert storage.read_bytes("s3://clipa/shards/000.tar", len(DATA)) == DATA
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=("s3://clipa/shards/001.tar", queue))
    child.start()
    try:
        assert queue.get(timeout=60) == DATA
    finally:
        child.join(10)
    assert child.exitcode == 0


@pytest.mark.slow
def test_s3_failures_are_one_line(s3, monkeypatch):
    cases = [
        ("s3://clipa/shards/404.tar", FileNotFoundError, "not found"),
        ("s3://no-such-bucket/x.tar", FileNotFoundError, "bucket does not exist"),
    ]
    for url, kind, cause in cases:
        with pytest.raises(kind, match=cause) as e:
            storage.open_read(url)
        _one_line(e.value, url)
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        storage.makedirs("s3://no-such-bucket/run")
    with pytest.raises(FileNotFoundError, match="no files match"):
        storage.expand("s3://clipa/shards/*.tfrecord")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    for call in (storage.open_read, storage.exists, storage.listdir, storage.glob):
        with pytest.raises(PermissionError, match="access denied") as e:
            call("s3://clipa/shards/*")
        _one_line(e.value, "s3://clipa/shards/*")
    with pytest.raises(PermissionError):
        storage.write_bytes_atomic("s3://clipa/run/latest", b"x")
    with pytest.raises(PermissionError):
        storage.makedirs("s3://clipa/run")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(PermissionError, match="no credentials") as e:
        storage.open_read("s3://clipa/shards/000.tar")
    _one_line(e.value, "s3://clipa/shards/000.tar")

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(storage, "RETRIES", 2)  # botocore's back-off: ~1 s a retry
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    t = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach") as e:
        storage.open_read("s3://clipa/shards/000.tar")
    _one_line(e.value, "s3://clipa/shards/000.tar")
    assert time.monotonic() - t < 30


# ----------------------------------------------------------------------------- GCS (the emulator)


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    with servers.gcs_server(str(tmp_path_factory.mktemp("gcs"))) as server:
        bucket = servers.gcs_client(server).bucket("clipa")
        for key in SHARDS:
            bucket.blob(key).upload_from_string(DATA)
        yield server


@pytest.fixture
def gcs(gcs_server, monkeypatch, small_blocks):
    for k, v in gcs_server.env.items():
        monkeypatch.setenv(k, v)
    return gcs_server


def test_gcs_read_list_write(gcs):
    with storage.open_read("gs://clipa/shards/002.tar") as f:
        assert f.size() == len(DATA)
        assert f.read(10) == DATA[:10]
        f.seek(100_000, 1)
        assert f.read() == DATA[100_010:]
    listed = [f"gs://clipa/{k}" for k in SHARDS]
    assert storage.expand("gs://clipa/shards/*.tar") == listed
    assert storage.expand("gs://clipa/shards/{000..002}.tar") == listed
    assert storage.listdir("gs://clipa/shards") == ["000.tar", "001.tar", "002.tar"]
    assert storage.isdir("gs://clipa/shards") and storage.isfile("gs://clipa/shards/000.tar")

    storage.makedirs("gs://clipa/run")
    storage.write_bytes_atomic("gs://clipa/run/latest", b"step_00000012\n")
    assert servers.gcs_client(gcs).bucket("clipa").blob("run/latest").download_as_bytes() == b"step_00000012\n"
    assert storage.read_text("gs://clipa/run/latest", 64) == "step_00000012\n"
    storage.upload(__file__, "gs://clipa/run/step_00000012/file")
    assert storage.listdir("gs://clipa/run") == ["latest", "step_00000012"]
    storage.remove("gs://clipa/run/step_00000012", recursive=True)
    assert storage.listdir("gs://clipa/run") == ["latest"]

    for url in ("gs://clipa/shards/404.tar", "gs://no-such-bucket/x.tar"):
        with pytest.raises(FileNotFoundError, match="not found") as e:
            storage.open_read(url)
        _one_line(e.value, url)
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        storage.makedirs("gs://no-such-bucket/run")


# ----------------------------------------------------------------------------- http(s)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    for key in SHARDS:
        os.makedirs(root / os.path.dirname(key), exist_ok=True)
        (root / key).write_bytes(DATA)
    with servers.http_server(str(root), str(tmp_path_factory.mktemp("http"))) as server:
        yield server


class _Flaky(http.server.BaseHTTPRequestHandler):
    """503 for the first `fail` GETs of /flaky, 403 for /secret, else the data."""

    fail = 2
    seen = 0

    def do_GET(self):
        if self.path == "/secret":
            self.send_error(403)
            return
        if self.path == "/flaky":
            type(self).seen += 1
            if type(self).seen <= type(self).fail:
                self.send_error(503)
                return
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA)

    def log_message(self, *args):
        pass


def test_http_read_retry_and_failures(web, small_blocks):
    url = f"{web.url}/shards/000.tar"
    with storage.open_read(url) as f:
        assert f.size() == len(DATA)
        assert f.read(10) == DATA[:10]
        f.seek(100_000, 1)
        assert f.read() == DATA[100_010:]
    assert storage.expand(f"{web.url}/shards/{{000..002}}.tar") == [f"{web.url}/{k}" for k in SHARDS]
    assert storage.exists(url) and not storage.exists(f"{web.url}/shards/404.tar")
    with pytest.raises(FileNotFoundError, match="not found") as e:
        storage.open_read(f"{web.url}/shards/404.tar")
    _one_line(e.value, f"{web.url}/shards/404.tar")
    t = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach") as e:
        storage.open_read("http://127.0.0.1:9/x.tar")  # retried RETRIES times, then one line
    _one_line(e.value, "http://127.0.0.1:9/x.tar")
    assert time.monotonic() - t < 10

    flaky = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=flaky.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{flaky.server_address[1]}"
        with storage.open_read(f"{base}/flaky") as f:  # two 503s, then served
            assert f.read() == DATA
        assert _Flaky.seen == 3
        _Flaky.seen = 0
        _Flaky.fail = 10  # more 503s than RETRIES: one line
        with pytest.raises(OSError, match="HTTP 503") as e:
            storage.open_read(f"{base}/flaky")
        assert _Flaky.seen == storage.RETRIES
        _one_line(e.value, f"{base}/flaky")
        with pytest.raises(PermissionError, match="access denied") as e:
            storage.open_read(f"{base}/secret")
        _one_line(e.value, f"{base}/secret")
    finally:
        flaky.shutdown()
        flaky.server_close()
