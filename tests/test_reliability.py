"""What a run promises (README "What a run promises"), tried as a preempted, unlucky or hostile user
would: kills at many moments (mid-save and inside the masked stage too), SIGTERM / SIGINT, a second
run into the same directory, a failing disk, non-finite losses, hostile checkpoint files. Every
test drives the real train.py in a subprocess on the tiny demo configuration."""

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time

import pytest
import torch
from runs import PY, REPO, env, losses, run, tiny_demo_args, train
from safetensors import safe_open
from safetensors.torch import save_file

import config
import data
import train as train_py
import xla_utils

pytestmark = pytest.mark.slow

# A wrapper around train.main with a fault planted in it: FAULT=kill_save:N SIGKILLs the process
# halfway through its N-th torch.save (a torn file on disk); FAULT=enospc_state:N / enospc_weights:N
# point the N-th train_state.pt / model.safetensors write at /dev/full, so the real libraries meet the
# kernel's ENOSPC as on a full disk; FAULT=nan_loss:N makes the N-th contrastive loss NaN.
FAULTY = r"""
import os, signal, sys, torch
import checkpoints, losses, train
kind, n = os.environ["FAULT"].split(":")
n, calls = int(n), {"save": 0, "weights": 0, "loss": 0}
real_save, real_weights, real_loss = torch.save, checkpoints.save_file, losses.clip_loss
def save(obj, f, *a, **k):
    calls["save"] += 1
    if calls["save"] == n and kind == "kill_save":
        f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    if calls["save"] == n and kind == "enospc_state":
        os.dup2(os.open("/dev/full", os.O_WRONLY), f.fileno())
    return real_save(obj, f, *a, **k)
def save_weights(tensors, path, **k):
    calls["weights"] += 1
    return real_weights(tensors, "/dev/full" if calls["weights"] == n and kind == "enospc_weights" else path, **k)
def loss(*a, **k):
    calls["loss"] += 1
    out = real_loss(*a, **k)
    return out * float("nan") if calls["loss"] == n and kind == "nan_loss" else out
torch.save, checkpoints.save_file, losses.clip_loss = save, save_weights, loss
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    p = tmp_path_factory.mktemp("faulty") / "faulty_train.py"
    p.write_text(FAULTY)
    return str(p)


def _weights(ckpt_dir):
    with safe_open(os.path.join(ckpt_dir, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _latest(out):
    ck = os.path.join(out, "checkpoints")
    with open(os.path.join(ck, "latest")) as f:
        return os.path.join(ck, f.read().strip())


def _assert_complete(ckpt_dir):
    """A checkpoint that `latest` names is whole: its three files, readable."""
    assert sorted(os.listdir(ckpt_dir)) == ["meta.json", "model.safetensors", "train_state.pt"], ckpt_dir
    torch.load(os.path.join(ckpt_dir, "train_state.pt"), weights_only=True)
    assert _weights(ckpt_dir)


def _start(args, script="train.py", **extra):
    return subprocess.Popen(
        [PY, script, *args], cwd=REPO, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(proc, metrics, step, since=0, timeout=300):
    """Wait until a record of `step` or later appears after byte `since` of metrics.jsonl."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics):
            with open(metrics) as f:
                f.seek(since)
                if any(json.loads(line).get("step", 0) >= step for line in f.read().splitlines() if line):
                    return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- kills and resumes

# (what, n): ("step", n) SIGKILL once this process logged global step n; ("save", n) SIGKILL inside
# this process's n-th torch.save. Steps 9-12 are the fine-tune stage, with 30% random image masking.
KILLS = [
    ("step", 2),
    ("save", 1),
    ("step", 5),
    ("save", 1),
    ("step", 8),
    ("step", 9),
    ("save", 1),
    ("step", 10),
    ("step", 11),
    ("save", 2),
    ("step", 12),
]


def test_a_chain_of_kills_ends_bit_identical(demo_small, uninterrupted, faulty, tmp_path):
    """SIGKILL at 11 moments (4 of them halfway through writing a checkpoint, 5 inside the masked
    fine-tune stage), each followed by --resume latest: the losses and the final weights and optimizer
    state equal the uninterrupted run's exactly; `latest` always names a complete checkpoint; no
    temporary file survives."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    killed = 0
    for what, n in KILLS:
        args = tiny_demo_args(demo_small, out)
        if (out / "checkpoints" / "latest").exists():
            args += ["--resume", "latest"]
        since = metrics.stat().st_size if metrics.exists() else 0
        if what == "save":
            proc = _start(args, script=faulty, FAULT=f"kill_save:{n}")
        else:
            proc = _start(args)
            if _wait_for_step(proc, str(metrics), n, since):
                proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=300)
        err = proc.stderr.read()
        assert rc in (0, -signal.SIGKILL), err[-2000:]
        killed += rc == -signal.SIGKILL
        if (out / "checkpoints" / "latest").exists():
            _assert_complete(_latest(out))
    assert killed >= 10, killed
    train(tiny_demo_args(demo_small, out, "--resume", "latest"))  # whatever is left
    want, _ = losses(uninterrupted)
    got, _ = losses(out)
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]  # bit for bit
    final, ref = _latest(out), _latest(uninterrupted)
    assert os.path.basename(final) == os.path.basename(ref) == "step_00000012"
    a, b = _weights(final), _weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)
    sa = torch.load(os.path.join(final, "train_state.pt"), weights_only=True)["optimizer"]["state"]
    sb = torch.load(os.path.join(ref, "train_state.pt"), weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sb)
    assert not [n for n in os.listdir(out / "checkpoints") if ".tmp" in n]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_then_exit(demo_small, uninterrupted, tmp_path, sig, status):
    """Preemption (SIGTERM) or Ctrl-C: the run saves the step it is at, says so in one line, exits
    with 128 + the signal, and --resume latest continues exactly."""
    out = tmp_path / "run"
    proc = _start(tiny_demo_args(demo_small, out, "--save-every", "1000"))
    assert _wait_for_step(proc, str(out / "metrics.jsonl"), 4)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == status
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    line = next(x for x in stdout.splitlines() if x.startswith("stopped by"))
    step = int(line.split(" at step ")[1].split(";")[0])
    assert line.startswith(f"stopped by {signal.Signals(sig).name} at step ") and "Traceback" not in stderr
    assert os.path.basename(_latest(out)) == f"step_{step:08d}"
    train(tiny_demo_args(demo_small, out, "--resume", "latest", "--save-every", "1000"))
    want, _ = losses(uninterrupted)
    got, _ = losses(out)
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]


# ----------------------------------------------------------------------------- one run per directory


def test_a_second_run_into_a_locked_directory_is_refused(demo_small, tmp_path):
    out = tmp_path / "run"
    # no checkpoint while the second starts: it would be refused for holding one before it reached the lock
    args = tiny_demo_args(demo_small, out, "--set", "pretrain.train_num_samples=3200", "--save-every", "1000")
    first = _start(args)
    try:
        assert _wait_for_step(first, str(out / "metrics.jsonl"), 1)
        before = (out / "metrics.jsonl").read_text()
        second = run([PY, "train.py", *args])
        assert second.returncode == 2
        assert second.stderr.startswith("error: ") and second.stderr.count("\n") == 1
        assert "is in use by another run (pid " in second.stderr
        assert (out / "metrics.jsonl").read_text().startswith(before)  # nothing of the second run
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------- a failing disk


def test_a_failed_save_is_reported_and_training_goes_on(demo_small, uninterrupted, faulty, tmp_path):
    """The 2nd checkpoint's train_state.pt hits a full disk: one warning line, training goes on, the
    previous checkpoint stays loadable and the run ends with the same losses; a final save whose
    weights hit a full disk is exit 1 with one line."""
    out = tmp_path / "run"
    p = run([PY, faulty, *tiny_demo_args(demo_small, out, "--keep", "5")], FAULT="enospc_state:2")
    assert p.returncode == 0, p.stderr[-2000:]
    warn = [x for x in p.stderr.splitlines() if x.startswith("warning: checkpoint")]
    assert warn == [
        "warning: checkpoint of step 6 not written ([Errno 28] No space left on device); the previous one stays"
    ]
    assert "step_00000006" not in os.listdir(out / "checkpoints")
    _assert_complete(out / "checkpoints" / "step_00000003")
    want, _ = losses(uninterrupted)
    assert losses(out)[0] == want
    # the save at the end of the run (the 5th: steps 3, 6, 8, 11, 12) fails: nothing to continue from
    out2 = tmp_path / "run2"
    p = run([PY, faulty, *tiny_demo_args(demo_small, out2, "--keep", "5")], FAULT="enospc_weights:5")
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1].startswith("error: the checkpoint of step 12 could not be written")
    assert os.path.basename(_latest(out2)) == "step_00000011"


# ----------------------------------------------------------------------------- non-finite losses


def test_a_nan_loss_stops_the_run_and_keeps_the_good_checkpoint(demo_small, faulty, tmp_path):
    """The 5th loss is NaN: the run stops within that step naming it (exit 1, one line), saves
    nothing after it, and the newest checkpoint (step 3) is good and was not pruned by --keep 1."""
    out = tmp_path / "run"
    p = run([PY, faulty, *tiny_demo_args(demo_small, out)], FAULT="nan_loss:5")
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1].startswith("error: the loss is not finite at step 5 (pretrain step 5)")
    assert os.path.basename(_latest(out)) == "step_00000003"
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000003"]
    assert all(torch.isfinite(t).all() for t in _weights(_latest(out)).values())


def test_nonfinite_skip_drops_the_update_and_goes_on(demo_small, uninterrupted, faulty, tmp_path):
    """--nonfinite skip: the NaN step's update is dropped (the weights after it equal the weights
    before it), a warning names the step, the run completes."""
    out = tmp_path / "run"
    p = run(
        [PY, faulty, *tiny_demo_args(demo_small, out, "--nonfinite", "skip", "--save-every", "1", "--keep", "20")],
        FAULT="nan_loss:5",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: the loss is not finite at step 5: its update was skipped" in p.stdout
    ck = out / "checkpoints"
    before, after = _weights(ck / "step_00000004"), _weights(ck / "step_00000005")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert os.path.basename(_latest(out)) == "step_00000012"


# ----------------------------------------------------------------------------- hostile files


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_checkpoints_on_resume_are_refused_in_one_line(demo_small, uninterrupted, tmp_path):
    """A pickle payload in train_state.pt (never run), weights of another shape, a `latest` that
    points outside the run, a checkpoint of another preset: one line each, exit 2, nothing trained."""
    src = _latest(uninterrupted)
    cases = {}
    evil = tmp_path / "evil" / "checkpoints" / "step_00000003"
    shutil.copytree(src, evil)
    marker = tmp_path / "payload_ran"
    with open(evil / "train_state.pt", "wb") as f:
        pickle.dump({"step": _Payload(str(marker))}, f)
    cases["pickle"] = (["--resume", str(evil)], "is not a readable train state")
    shapes = tmp_path / "shapes" / "checkpoints" / "step_00000012"
    shutil.copytree(src, shapes)
    w = _weights(shapes)
    w["visual.proj"] = torch.zeros(3, 3)
    save_file(w, str(shapes / "model.safetensors"))
    cases["shapes"] = (["--resume", str(shapes)], "does not hold weights of this model")
    outside = tmp_path / "outside"
    (outside / "checkpoints").mkdir(parents=True)
    (outside / "checkpoints" / "latest").write_text("../../shapes/checkpoints/step_00000012\n")
    cases["latest"] = (["--resume", "latest", "--out", str(outside)], "not a checkpoint directory beside it")
    cases["preset"] = (["--cfg", "b16_i50_t16", "--resume", src], "of preset demo, not of b16_i50_t16")
    for name, (extra, needle) in cases.items():
        out = tmp_path / f"out_{name}"
        args = tiny_demo_args(demo_small, out) + extra
        p = run([PY, "train.py", *args])
        assert p.returncode == 2, (name, p.stderr[-1500:])
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and needle in p.stderr, (name, p.stderr)
        assert not (out / "metrics.jsonl").exists(), name
    assert not marker.exists()


def test_changed_settings_on_resume_need_force(demo_small, uninterrupted, tmp_path):
    """A resume with another seed (or batch size, workers, world size) would not continue the run
    exactly: refused with what changed; --force-resume continues anyway."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "latest").write_text("step_00000008\n")
    p = run([PY, "train.py", *tiny_demo_args(demo_small, out, "--resume", "latest", "--seed", "3")])
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "seed 0 -> 3" in p.stderr and "--force-resume" in p.stderr
    train(tiny_demo_args(demo_small, out, "--resume", "latest", "--seed", "3", "--force-resume"))
    assert os.path.basename(_latest(out)) == "step_00000012"


# ----------------------------------------------------------------------------- corrupt checkpoints


def _write_nan(ckpt_dir):
    """A NaN written over the first value of a float32 tensor, in place (the file stays whole)."""
    file = os.path.join(ckpt_dir, "model.safetensors")
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
        f.seek(8 + n + header[name]["data_offsets"][0])
        f.write(torch.tensor([math.nan]).numpy().tobytes())


def _cut(file, keep):
    with open(file, "r+b") as f:
        f.truncate(keep(os.path.getsize(file)))


CORRUPTIONS = {
    "weights truncated": (lambda d: _cut(d / "model.safetensors", lambda n: n // 2), "is truncated or torn"),
    "weights empty": (lambda d: _cut(d / "model.safetensors", lambda n: 0), "model.safetensors is empty"),
    "weights nan": (_write_nan, "holds non-finite values (NaN/Inf)"),
    "state truncated": (lambda d: _cut(d / "train_state.pt", lambda n: n // 2), "is not a readable train state"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_stepped_back_past_or_refused_by_name(
    demo_small, uninterrupted, tmp_path, capsys, kind
):
    """A torn, empty or non-finite newest checkpoint: --resume latest takes the newest whole one
    before it with one line naming the one skipped; named explicitly, it is one line, exit 2."""
    corrupt, needle = CORRUPTIONS[kind]
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step_00000012"
    corrupt(newest)
    run_cfg, stages, _ = config.parse_args(tiny_demo_args(demo_small, out, "--resume", "latest"), "train.py", False)
    path, state, note = train_py.load_resume_state("latest", run_cfg, stages)
    assert path == str(out / "checkpoints" / "step_00000008") and state["step"] == 8
    assert note.startswith("warning: --resume latest skipped step_00000012 (") and needle in note, note
    assert "\n" not in note and note.endswith(f"resuming from {path}")
    other = tmp_path / "other"
    assert train_py.main(tiny_demo_args(demo_small, other, "--resume", str(newest))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (other / "metrics.jsonl").exists()
    # nothing whole left to step back to: one line, exit 2
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    assert train_py.main(tiny_demo_args(demo_small, out, "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume latest: no whole checkpoint in ") and err.count("\n") == 1, err


def test_resume_auto_takes_the_newest_whole_checkpoint_or_starts_fresh(demo_small, uninterrupted, tmp_path, capsys):
    """--resume auto: `latest`'s rules when --out holds a checkpoint (a corrupt newest one stepped back
    past, nothing whole left refused); the newest whole step directory when a kill came between the first
    checkpoint and its pointer; nothing at all: a fresh start."""
    out = tmp_path / "run"
    run_cfg, stages, _ = config.parse_args(tiny_demo_args(demo_small, out, "--resume", "auto"), "train.py", False)
    assert train_py.load_resume_state("auto", run_cfg, stages) == (None, None, "")
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    ck = out / "checkpoints"
    _cut(ck / "step_00000012" / "model.safetensors", lambda n: n // 2)
    path, state, note = train_py.load_resume_state("auto", run_cfg, stages)
    assert path == str(ck / "step_00000008") and state["step"] == 8
    assert note.startswith("warning: --resume auto skipped step_00000012 ("), note
    (ck / "latest").unlink()
    shutil.rmtree(ck / "step_00000012")
    path, state, _ = train_py.load_resume_state("auto", run_cfg, stages)
    assert path == str(ck / "step_00000008") and state["step"] == 8
    _cut(ck / "step_00000008" / "model.safetensors", lambda n: 0)
    assert train_py.main(tiny_demo_args(demo_small, out, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume auto: no whole checkpoint in ") and err.count("\n") == 1, err


def test_a_run_resumed_past_a_corrupt_checkpoint_ends_as_the_uninterrupted_one(demo_small, uninterrupted, tmp_path):
    """A NaN in the newest checkpoint's weights: --resume latest says it skipped it, continues from
    the one before, re-saves the step exactly; a clean run's lock leaves nothing to take over."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)  # with the lock file the clean run released
    _write_nan(out / "checkpoints" / "step_00000012")
    p = run([PY, "train.py", *tiny_demo_args(demo_small, out, "--resume", "latest")])
    assert p.returncode == 0, p.stderr[-3000:]
    said = [x for x in p.stderr.splitlines() if x.startswith(("warning", "error"))]
    assert len(said) == 1 and said[0].startswith("warning: --resume latest skipped step_00000012 ("), p.stderr
    assert "taking over the lock" not in p.stdout
    assert os.path.basename(_latest(out)) == "step_00000012"
    a, b = _weights(_latest(out)), _weights(_latest(uninterrupted))
    assert all(torch.equal(a[k], b[k]) for k in b)


# ----------------------------------------------------------------------------- links and devices


def test_a_latest_pointer_to_another_file_is_refused_unread(demo_small, tmp_path, capsys):
    """checkpoints/latest linked to /etc/passwd (or holding a copy of it): one line that shows none
    of it, exit 2."""
    for kind in ("link", "copy"):
        out = tmp_path / kind
        (out / "checkpoints").mkdir(parents=True)
        pointer = out / "checkpoints" / "latest"
        if kind == "link":
            pointer.symlink_to("/etc/passwd")
        else:
            shutil.copyfile("/etc/passwd", pointer)
        assert train_py.main(tiny_demo_args(demo_small, out, "--resume", "latest")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "latest" in err, err
        assert "root:x" not in err and len(err) < 300, err


def test_a_lock_file_that_is_a_link_is_refused_not_written_through(demo_small, tmp_path, capsys, monkeypatch):
    """OUT/.lock (train.py) and DST/.lock (data.py reshard) as a symlink to a file of the user's:
    one line, exit 2, the file untouched and nothing of it shown."""
    precious = tmp_path / "precious.txt"
    precious.write_text("root:x:0:0:the user's own file\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(precious)
    p = run([PY, "train.py", *tiny_demo_args(demo_small, out)])
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and ".lock" in p.stderr, p.stderr
    assert "root:x" not in p.stderr + p.stdout and not (out / "metrics.jsonl").exists()
    dst = tmp_path / "resharded"
    dst.mkdir()
    (dst / ".lock").symlink_to(precious)
    monkeypatch.setattr(xla_utils, "TF_AFTER_XLA", xla_utils.TF_AFTER_XLA)  # data.main clears it
    assert data.main(["reshard", demo_small.train_wds, str(dst), "--max-side", "64", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "symbolic link" in err and "root:x" not in err, err
    assert not [n for n in os.listdir(dst) if n.endswith(".tar")]
    assert precious.read_text() == "root:x:0:0:the user's own file\n"
