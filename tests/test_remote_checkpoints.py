"""Checkpoints on object stores (docs/reliability.md#remote-output): a run into `--out s3://...` or
`--out gs://...` stages each checkpoint locally, uploads it, verifies it and only then writes `latest`;
a run killed mid-upload and re-run with `--resume auto` ends bit-identical to an uninterrupted run; a
checkpoint is read from s3://, gs:// and http:// wherever one is asked for (--resume, --pretrained,
--ckpt). Against real servers on loopback (tests/servers.py): moto's S3 server, the GCS emulator and
python -m http.server."""

import json
import os
import signal
import subprocess
import time

import pytest
import servers
import torch
from runs import PY, REPO, env, free_port, losses, run, tiny_demo_args
from safetensors import safe_open

import checkpoints
import config
import eval_zeroshot
import factory
import storage
import train as train_py

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(file):
    with safe_open(file, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _same(a, b) -> bool:
    """Equal nested train states: tensors bit for bit, everything else by value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _one_line_error(err: str, *fragments):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def _listing(out: str) -> dict:
    """{path below out: size} of every object under the store prefix `out` (the store's own listing)."""
    fs = storage._filesystem(storage.scheme(out))
    prefix = storage._store_path(out).split("://", 1)[1]
    return {p[len(prefix) + 1 :]: fs.info(p)["size"] for p in fs.find(prefix)}


def _read(url: str) -> bytes:
    return storage.read_bytes(url, 1 << 30)


# ----------------------------------------------------------------------------- the servers


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with servers.s3_server(str(tmp_path_factory.mktemp("s3"))) as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CLIPA_STAGING", str(tmp_path / "staging"))
    return s3_server


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    with servers.gcs_server(str(tmp_path_factory.mktemp("gcs"))) as server:
        yield server


@pytest.fixture(scope="module")
def web(uninterrupted, tmp_path_factory):
    """http.server serving the uninterrupted run's directory."""
    with servers.http_server(str(uninterrupted), str(tmp_path_factory.mktemp("http"))) as server:
        yield server


def _committed(out: str) -> bool:
    """A first checkpoint committed, and the logs uploaded after it (their last file, TensorBoard's)."""
    return storage.exists(f"{out}/checkpoints/latest") and any(p.startswith("tensorboard/") for p in _listing(out))


def _kill_and_resume(demo, out, uninterrupted, server, tmp_path, kill_after=None):
    """The tiny two-stage run into the remote `out`, SIGKILLed by itself right after it uploaded
    `kill_after` (NAME/FILE), or (None) by the test once `latest` is on the store, then re-run with
    --resume auto on another machine (a fresh staging directory): it ends bit-identical to the
    uninterrupted local run. Returns the store's listing as the kill left it."""
    args = [PY, "train.py", *tiny_demo_args(demo, out, "--resume", "auto")]
    if kill_after:
        first = run(args, **server.env, CLIPA_STAGING=tmp_path / "a", **{checkpoints.KILL_AFTER_UPLOAD: kill_after})
        assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-3000:]
    else:
        with open(tmp_path / "first.log", "wb") as log:
            proc = subprocess.Popen(
                args, cwd=REPO, env=env(**server.env, CLIPA_STAGING=tmp_path / "a"), stdout=log, stderr=log
            )
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not _committed(out):
            time.sleep(0.2)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    killed = _listing(out)
    second = run(args, **server.env, CLIPA_STAGING=tmp_path / "b")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout
    # the records of both runs are on the store, the last of each step as the uninterrupted run's
    local = tmp_path / "metrics"
    local.mkdir()
    storage.download(f"{out}/metrics.jsonl", str(local / "metrics.jsonl"))
    want, got = losses(uninterrupted)[0], losses(local)[0]
    assert got == want and sorted(got) == list(range(1, 13))
    latest = _read(f"{out}/checkpoints/latest").decode().strip()
    assert latest == "step_00000012"
    storage.download(f"{out}/checkpoints/{latest}/model.safetensors", str(local / "model.safetensors"))
    a, b = _weights(local / "model.safetensors"), _weights(uninterrupted / "checkpoints" / latest / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    # --keep 1 and each stage's last: nothing else, no half checkpoint, the lock record let go
    names = {p.split("/")[1] for p in _listing(out) if p.startswith("checkpoints/")}
    assert names == {"latest", "step_00000008", "step_00000012"}
    for name in ("step_00000008", "step_00000012"):
        manifest = json.loads(_read(f"{out}/checkpoints/{name}/{checkpoints.MANIFEST}"))["files"]
        assert sorted(manifest) == sorted(checkpoints.CHECKPOINT_FILES)
    assert ".lock" not in _listing(out)
    # both processes' TensorBoard event files (the default tracker), in the one run's folder: the
    # resumed process read the run id back from the store and continued that run
    events = [p for p in _listing(out) if p.startswith("tensorboard/")]
    run_id = json.loads(_read(f"{out}/tracker_run.json"))["run_id"]
    assert len(events) == 2 and {p.split("/")[1] for p in events} == {run_id}
    return killed


@pytest.mark.slow
def test_s3_out_killed_mid_upload_resumes_exactly(demo_small, uninterrupted, s3, tmp_path):
    """Killed after the weights of step 6 reached the store, before the rest and its manifest: `latest`
    still names step 3, whole; the re-run resumes from it and writes step 6 again."""
    out = "s3://clipa/killed"
    killed = _kill_and_resume(demo_small, out, uninterrupted, s3, tmp_path, "step_00000006/model.safetensors")
    # the store as the kill left it
    assert "checkpoints/step_00000006/model.safetensors" in killed
    assert "checkpoints/step_00000006/manifest.json" not in killed  # a half checkpoint ...
    assert "checkpoints/step_00000003/manifest.json" in killed  # ... and `latest` named the whole one
    assert ".lock" in killed and "metrics.jsonl" in killed


@pytest.mark.slow
def test_s3_out_killed_during_training_resumes_exactly(demo_small, uninterrupted, s3, tmp_path):
    """SIGKILL from outside once the first checkpoint is committed, wherever the run then is."""
    killed = _kill_and_resume(demo_small, "s3://clipa/sigkill", uninterrupted, s3, tmp_path)
    assert "checkpoints/latest" in killed


@pytest.mark.slow
def test_gcs_out_killed_between_upload_and_pointer_resumes_exactly(
    demo_small, uninterrupted, gcs_server, tmp_path, monkeypatch
):
    """Killed after step 11 was uploaded and verified, before `latest` named it: the re-run resumes from
    step 8 (the pre-train stage's end, into the fine-tune stage) as `latest` says, ignoring step 11."""
    for k, v in gcs_server.env.items():
        monkeypatch.setenv(k, v)
    out = "gs://clipa/killed"
    killed = _kill_and_resume(
        demo_small, out, uninterrupted, gcs_server, tmp_path, f"step_00000011/{checkpoints.MANIFEST}"
    )
    assert "checkpoints/step_00000011/manifest.json" in killed
    assert {p for p in killed if p.startswith("checkpoints/step")} >= {"checkpoints/step_00000008/manifest.json"}


@pytest.fixture
def full_out(uninterrupted, s3):
    """The uninterrupted run's checkpoints 8 and 12 published to s3://clipa/full as a run publishes them."""
    out = "s3://clipa/full"
    root = f"{out}/checkpoints"
    for name in ("step_00000008", "step_00000012"):
        checkpoints.publish_checkpoint(str(uninterrupted / "checkpoints" / name), root, keep=3)
    return out


@pytest.mark.slow
def test_resume_auto_on_an_empty_and_a_full_remote_out_and_the_rerun_refusal(
    demo_small, uninterrupted, full_out, capsys
):
    """--resume auto: a fresh start on an empty --out; the checkpoint `latest` names on a full one, and a
    checkpoint whose object differs from its manifest is stepped back past. Without --resume, a remote
    --out that holds checkpoints is refused in one line and nothing on the store changes."""
    parse = config.parse_args
    run_cfg, stages, _ = parse(tiny_demo_args(demo_small, "s3://clipa/empty", "--resume", "auto"), "train.py", False)
    assert train_py.load_resume_state("auto", run_cfg, stages) == (None, None, "")
    run_cfg, stages, _ = parse(tiny_demo_args(demo_small, full_out, "--resume", "auto"), "train.py", False)
    path, state, note = train_py.load_resume_state("auto", run_cfg, stages)
    assert state["step"] == 12 and note == ""
    assert (
        _weights(os.path.join(path, "model.safetensors")).keys()
        == _weights(uninterrupted / "checkpoints" / "step_00000012" / "model.safetensors").keys()
    )

    before = _listing(full_out)
    assert train_py.main(tiny_demo_args(demo_small, full_out)) == 2
    _one_line_error(capsys.readouterr().err, f"--out {full_out} already holds checkpoints", "--resume auto")
    assert _listing(full_out) == before

    # another object of the same size under step 12's weights: only its checksum tells
    url = f"{full_out}/checkpoints/step_00000012/model.safetensors"
    data = bytearray(_read(url))
    data[-1] ^= 1
    storage.write_bytes_atomic(url, bytes(data))
    path, state, note = train_py.load_resume_state("auto", run_cfg, stages)
    assert state["step"] == 8
    assert note.startswith("warning: --resume auto skipped step_00000012 (") and "differs from its manifest" in note


@pytest.mark.slow
def test_only_cut_short_uploads_start_fresh_and_are_written_over(demo_small, uninterrupted, s3):
    """Killed during the first upload (no `latest`, no manifest): --resume auto starts fresh; --resume
    latest says there is no whole checkpoint."""
    out = "s3://clipa/cut"
    storage.upload(
        str(uninterrupted / "checkpoints" / "step_00000008" / "model.safetensors"),
        f"{out}/checkpoints/step_00000003/model.safetensors",
    )
    run_cfg, stages, _ = config.parse_args(tiny_demo_args(demo_small, out, "--resume", "auto"), "train.py", False)
    path, state, note = train_py.load_resume_state("auto", run_cfg, stages)
    assert (path, state) == (None, None) and "holds only uploads cut short" in note
    with pytest.raises(checkpoints.CorruptCheckpoint, match="no whole checkpoint"):
        train_py.load_resume_state("latest", run_cfg, stages)


@pytest.mark.slow
def test_checkpoints_read_from_s3_and_http_are_the_local_ones(demo_small, uninterrupted, full_out, web, tmp_path):
    """--pretrained / --ckpt / --resume CKPT on s3:// and http://: the same weights and train state as the
    local files, whichever form names them (a checkpoint directory, a run's checkpoints/, a weights file)."""
    local = uninterrupted / "checkpoints" / "step_00000012"
    want = factory.create_model(None, pretrained=str(local)).state_dict()
    for url in (
        f"{full_out}/checkpoints",
        f"{full_out}/checkpoints/step_00000012/model.safetensors",
        f"{web.url}/checkpoints/step_00000012",
        f"{web.url}",
        f"{web.url}/checkpoints/latest",
        f"{web.url}/checkpoints/step_00000012/model.safetensors",
    ):
        got = factory.create_model(None, pretrained=url).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), url

    run_cfg, stages, _ = config.parse_args(tiny_demo_args(demo_small, tmp_path / "o"), "train.py", False)
    _, ref, _ = train_py.load_resume_state(str(uninterrupted / "checkpoints" / "step_00000008"), run_cfg, stages)
    for url in (f"{full_out}/checkpoints/step_00000008", f"{web.url}/checkpoints/step_00000008"):
        _, state, _ = train_py.load_resume_state(url, run_cfg, stages)
        assert state["step"] == 8 and _same(state, ref), url

    # --pretrained from the store passes the trainer's checks (weights that fit the first stage)
    args = tiny_demo_args(demo_small, tmp_path / "ft", "--stage", "finetune", "--pretrained", f"{full_out}/checkpoints")
    run_cfg, stages, _ = config.parse_args(args, "train.py", False)
    train_py.check_inputs(run_cfg, stages)
    assert run_cfg.pretrained == f"{full_out}/checkpoints"

    # eval_zeroshot.py --ckpt: the same numbers from the store, the web server and the local file
    results = []
    for i, ckpt in enumerate((str(local), f"{full_out}/checkpoints/step_00000012", f"{web.url}/checkpoints")):
        out = tmp_path / f"eval{i}.json"
        argv = ["--ckpt", ckpt, "--data", demo_small.val_dir, "--workers", "0", "--no-progress", "--out", str(out)]
        argv += ["--device", "cpu", "--templates", "short"]
        assert eval_zeroshot.main(argv) == 0
        res = json.loads(out.read_text())
        assert res.pop("checkpoint") == (ckpt if "://" in ckpt else os.path.abspath(ckpt))
        results.append({k: v for k, v in res.items() if "second" not in k})  # all but the timings
    assert results[0] == results[1] == results[2] and results[0]["n"] == 72


@pytest.mark.slow
def test_unusable_stores_are_one_line_before_the_first_step(demo_small, s3, monkeypatch, capsys, tmp_path):
    """A missing bucket, a wrong key, an unreachable endpoint; a --pretrained / --resume object that is not
    there: one line naming the URL and the cause, exit 2, before any work."""
    monkeypatch.setattr(storage, "RETRY_DELAY", 0.05)
    assert train_py.main(tiny_demo_args(demo_small, "s3://nobucket/run")) == 2
    _one_line_error(capsys.readouterr().err, "s3://nobucket", "no such bucket")
    args = tiny_demo_args(demo_small, "s3://clipa/run", "--pretrained", "s3://clipa/nothing/model.safetensors")
    assert train_py.main(args) == 2
    _one_line_error(capsys.readouterr().err, "s3://clipa/nothing")
    assert train_py.main(tiny_demo_args(demo_small, tmp_path / "o", "--resume", "s3://clipa/nothing")) == 2
    _one_line_error(capsys.readouterr().err, "s3://clipa/nothing", "not found")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert train_py.main(tiny_demo_args(demo_small, "s3://clipa/run")) == 2
    _one_line_error(capsys.readouterr().err, "s3://clipa", "access denied")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert train_py.main(tiny_demo_args(demo_small, "s3://clipa/run")) == 2
    _one_line_error(capsys.readouterr().err, "s3://clipa", "cannot reach")
    assert not os.path.exists("s3:") and not os.path.exists(tmp_path / "o" / "checkpoints")


@pytest.mark.slow
def test_a_lock_record_on_the_store_is_said_and_let_go(demo_small, s3, capsys):
    """OUT/.lock on the store, left by a run that did not end cleanly (preempted, or still going on
    another machine): said in one line and replaced; a run that ends removes its own record."""
    out = "s3://clipa/locked"
    storage.write_bytes_atomic(f"{out}/.lock", b"pid 7 on other-host since Sat Dec  5 01:00:00 2026\n")
    assert train_py.main(tiny_demo_args(demo_small, out, "--stage", "pretrain", "--max-steps", "1")) == 0
    said = capsys.readouterr().out
    assert "taking over the lock of a run that ended without releasing it (pid 7 on other-host since " in said
    assert f"recorded in {out}/.lock" in said
    objects = _listing(out)
    assert ".lock" not in objects and "checkpoints/step_00000001/manifest.json" in objects
    assert _read(f"{out}/checkpoints/latest") == b"step_00000001\n"
