"""Real storage servers on loopback for the tests, started as a user starts them: moto's S3 server
(`python -m moto.server`), a GCS emulator (`gcp-storage-emulator start`) and `python -m http.server`.
Each is a subprocess on a free port of 127.0.0.1, waited for within START_SECONDS and stopped (its
whole process group) when the `with` block ends. Each yields the environment variables that point the
clients at it, as a user would set them (storage.py reads them): tests set them with monkeypatch, or
pass them to a script's process through runs.env(**server.env).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from runs import free_port

START_SECONDS = 60.0  # a cold start on 2 busy cores takes a few seconds; past this it is broken
STOP_SECONDS = 10.0
# moto serves this many requests without checking credentials: the three that make a user and its key
# (below); every request after them must be signed with that key, so a wrong one is refused (403)
FREE_REQUESTS = 3
# the first requests a server answers go to the clients' own checks: these keep every client on loopback
# (no EC2 / GCE metadata server, no ~/.aws files)
OFFLINE = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_GCE_CHECK": "true",
}


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    env: dict = field(default_factory=dict)  # what points a client at it (and its credentials)
    log: str = ""  # the server's output, for a failed test's message
    root: str = ""  # http.server: the directory it serves


def _wait_listening(proc: subprocess.Popen, port: int, log: str):
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server not listening on port {port} after {START_SECONDS:g} s: {_tail(log)}")


def _tail(log: str) -> str:
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        return f.read()[-2000:]
    return ""


@contextlib.contextmanager
def _process(cmd: list[str], port: int, log: str, env: dict | None = None):
    """Run `cmd` (a server that listens on `port`) in a process group of its own; stop the group at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, **(env or {})),
        )
    try:
        _wait_listening(proc, port, log)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def s3_server(workdir: str, buckets=("clipa",)):
    """moto's S3 server with credential checks on: a user whose key may do anything on S3, and `buckets`
    made with it. env: AWS_ENDPOINT_URL and that user's key (boto3, s3fs and the aws CLI read them)."""
    import boto3

    port = free_port()
    log = os.path.join(workdir, "moto.log")
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _process(cmd, port, log, {"INITIAL_NO_AUTH_ACTION_COUNT": str(FREE_REQUESTS)}):
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        iam.create_user(UserName="clipa")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="clipa", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="clipa")["AccessKey"]
        env = dict(
            OFFLINE,
            AWS_ENDPOINT_URL=url,
            AWS_ACCESS_KEY_ID=key["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
        )
        server = Server(url, env, log)
        client = s3_client(server)
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield server


def s3_client(server: Server):
    """boto3's S3 client for `server`, with its key: to upload and inspect objects."""
    import boto3

    e = server.env
    return boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
    )


@contextlib.contextmanager
def gcs_server(workdir: str, buckets=("clipa",)):
    """The gcp-storage-emulator (in memory) with `buckets`. env: STORAGE_EMULATOR_HOST (gcsfs and
    google-cloud-storage read it; the emulator takes no credentials)."""
    port = free_port()
    log = os.path.join(workdir, "gcs.log")
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(port), "-M"]
    with _process(cmd, port, log):
        url = f"http://127.0.0.1:{port}"
        server = Server(url, dict(OFFLINE, STORAGE_EMULATOR_HOST=url, GOOGLE_CLOUD_PROJECT="test"), log)
        client = gcs_client(server)
        for b in buckets:
            client.create_bucket(b)
        yield server


def gcs_client(server: Server):
    """google-cloud-storage's client for `server` (anonymous, as the emulator wants)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    return gcs.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": server.url})


@contextlib.contextmanager
def http_server(root: str, workdir: str):
    """`python -m http.server` serving the directory `root`."""
    port = free_port()
    log = os.path.join(workdir, "http.log")
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", root]
    with _process(cmd, port, log):
        yield Server(f"http://127.0.0.1:{port}", {}, log, root)
