"""checkpoints.py: atomic files and directories, checkpoint directories, the path resolver, and
write failures that surface as OSError whichever library writes (a full disk is the kernel's
ENOSPC from /dev/full here, not a raised stand-in)."""

import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_checkpoint_follows_latest_and_stays_inside(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    (ck / "step_00000010").mkdir(parents=True)
    (ck / "step_00000010" / "model.safetensors").write_bytes(b"x")
    (ck / "latest").write_text("step_00000010\n")
    want = str(ck / "step_00000010")
    for path in (tmp_path / "run", ck, ck / "latest", ck / "step_00000010"):
        assert checkpoints.resolve_checkpoint(str(path)) == want, path
    weights = ck / "step_00000010" / "model.safetensors"
    assert checkpoints.resolve_checkpoint(str(weights)) == str(weights)
    (ck / "latest").write_text("../../elsewhere\n")
    with pytest.raises(ValueError, match="not a checkpoint directory beside it"):
        checkpoints.resolve_checkpoint(str(tmp_path / "run"))
    (ck / "latest").write_text("step_00000099\n")
    with pytest.raises(FileNotFoundError, match="names step_00000099, which does not exist"):
        checkpoints.resolve_checkpoint(str(ck))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoints.resolve_checkpoint(str(tmp_path / "nothing"))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "state.pt"
    checkpoints.atomic_write(str(path), lambda p: checkpoints.save_state({"step": 1, "w": torch.ones(3)}, p))

    def boom(p):
        with open(p, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.atomic_write(str(path), boom)
    assert torch.load(path, weights_only=True)["step"] == 1  # the old file, intact
    assert os.listdir(tmp_path) == ["state.pt"]  # no temporary left behind

    def fill_then_die(tmp_dir):
        with open(os.path.join(tmp_dir, "a"), "w") as f:
            f.write("x")
        raise RuntimeError("killed while writing")

    d = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="killed"):
        checkpoints.atomic_dir(str(d), fill_then_die)
    assert not d.exists() and sorted(os.listdir(tmp_path)) == ["state.pt"]
    checkpoints.atomic_dir(str(d), lambda t: open(os.path.join(t, "a"), "w").write("x"))
    assert (d / "a").read_text() == "x"


def test_a_state_written_in_short_writes_loads_whole(tmp_path, monkeypatch):
    """The kernel may write part of a buffer: every byte still lands (torch.save checks nothing)."""
    state = {"step": 3, "m": torch.randn(300, 7), "rng": [torch.arange(5)]}
    real_write = os.write
    monkeypatch.setattr(checkpoints.os, "write", lambda fd, b: real_write(fd, bytes(memoryview(b)[:777])))
    checkpoints.save_state(state, str(tmp_path / "s.pt"))
    got = torch.load(tmp_path / "s.pt", weights_only=True)
    assert got["step"] == 3 and torch.equal(got["m"], state["m"]) and torch.equal(got["rng"][0], state["rng"][0])


@pytest.mark.parametrize("writer", ["save_state", "save_weights"])
def test_a_full_disk_is_an_oserror_whichever_library_writes(writer):
    """/dev/full answers every write with ENOSPC: torch.save and safetensors, writing to it, must
    raise OSError(28) (given a path, torch says RuntimeError "unexpected pos", safetensors says
    SafetensorError), the error the trainer turns into "checkpoint not written; training goes on"."""
    with pytest.raises(OSError) as e:
        getattr(checkpoints, writer)({"w": torch.randn(256, 256)}, "/dev/full")
    assert e.value.errno == 28


def test_a_checkpoint_that_meets_a_full_disk_leaves_the_previous_one(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    w = {"w": torch.ones(2, 3)}

    def save(name):
        return checkpoints.write_checkpoint(root, name, w, {"k": "v"}, {"step": 1}, {"step": 1}, keep=1)

    save("step_00000001")
    real_open = checkpoints.os.open
    monkeypatch.setattr(
        checkpoints.os,
        "open",
        lambda path, *a, **k: real_open("/dev/full" if str(path).endswith("train_state.pt") else path, *a, **k),
    )
    with pytest.raises(OSError) as e:
        save("step_00000002")
    assert e.value.errno == 28
    assert sorted(os.listdir(root)) == ["latest", "step_00000001"]  # no temporary, no torn step 2
    assert checkpoints.resolve_checkpoint(root).endswith("step_00000001")
    assert torch.equal(load_file(os.path.join(root, "step_00000001", "model.safetensors"))["w"], w["w"])


def test_steps_beyond_keep_are_pruned_except_protected_ones(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (1, 2, 3, 4):
        name = f"step_{step:08d}"
        checkpoints.write_checkpoint(
            root, name, {"w": torch.ones(2)}, {}, {"step": step}, {"step": step}, keep=2, protected={"step_00000001"}
        )
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000003", "step_00000004"]
    assert checkpoints.resolve_checkpoint(root).endswith("step_00000004")


def test_remove_temporaries_deletes_only_what_a_killed_writer_left(tmp_path):
    (tmp_path / ".train_state.pt.tmp123").write_bytes(b"half a file")
    (tmp_path / ".step_00000004.tmp77").mkdir()
    (tmp_path / ".step_00000004.tmp77" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "step_00000003").mkdir()
    (tmp_path / ".lock").write_text("pid 1")
    (tmp_path / "notes.tmp5").write_text("not hidden: not ours")
    gone = checkpoints.remove_temporaries(str(tmp_path))
    assert sorted(gone) == [".step_00000004.tmp77", ".train_state.pt.tmp123"]
    assert sorted(os.listdir(tmp_path)) == [".lock", "notes.tmp5", "step_00000003"]
    assert checkpoints.remove_temporaries(str(tmp_path / "absent")) == []


def test_resaving_an_older_step_never_prunes_the_checkpoint_latest_names(tmp_path):
    """Newer step directories (a corrupt one stepped back past, a future left by resuming an older
    checkpoint) do not count against --keep: the checkpoint just written stays, `latest` names it."""
    root = str(tmp_path / "checkpoints")
    for step in (1, 2, 3, 4):
        checkpoints.write_checkpoint(root, f"step_{step:08d}", {"w": torch.ones(2)}, {}, {}, {}, keep=3)
    checkpoints.write_checkpoint(root, "step_00000002", {"w": torch.zeros(2)}, {}, {}, {}, keep=1)
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000003", "step_00000004"]
    assert checkpoints.resolve_checkpoint(root).endswith("step_00000002")


def _checkpoint(d, weights):
    d.mkdir(parents=True)
    checkpoints.save_weights(weights, str(d / "model.safetensors"))
    return str(d)


def test_a_torn_empty_or_nonfinite_checkpoint_is_corrupt(tmp_path):
    w = {"a": torch.randn(64, 64), "b": torch.randn(100), "step": torch.arange(3)}
    good = _checkpoint(tmp_path / "good", w)
    checkpoints.check_checkpoint(good, {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "step": 4})
    file = tmp_path / "good" / "model.safetensors"
    raw = file.read_bytes()
    cases = {
        "truncated": (raw[: len(raw) - 100], "is truncated or torn"),
        "one byte more": (raw + b"\0", "is truncated or torn"),
        "cut in its header": (raw[:20], "no valid header"),
        "empty": (b"", "is empty"),
    }
    for name, (content, needle) in cases.items():
        d = _checkpoint(tmp_path / name, w)
        (tmp_path / name / "model.safetensors").write_bytes(content)
        with pytest.raises(checkpoints.CorruptCheckpoint, match=needle):
            checkpoints.check_checkpoint(d, {})
    nan = dict(w, b=torch.full((100,), float("nan")))
    with pytest.raises(checkpoints.CorruptCheckpoint, match=r"non-finite values \(NaN/Inf\) in b"):
        checkpoints.check_checkpoint(_checkpoint(tmp_path / "nan", nan), {})
    state = {"optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}}}
    with pytest.raises(checkpoints.CorruptCheckpoint, match=r"train_state.pt holds .* in optimizer.state.0.exp_avg"):
        checkpoints.check_checkpoint(good, state)
    with pytest.raises(checkpoints.CorruptCheckpoint, match="is missing"):
        checkpoints.check_checkpoint(str(tmp_path), {})
    assert checkpoints.older_checkpoints(str(tmp_path / "step_00000009")) == []


SECRET = "root:x:0:0:the contents of a file that is not ours\n"


@pytest.mark.parametrize("kind", ["symlink", "copy", "fifo", "long"])
def test_a_latest_pointer_is_a_few_bytes_of_a_regular_file_never_shown(tmp_path, kind):
    ck = tmp_path / "run" / "checkpoints"
    (ck / "step_00000010").mkdir(parents=True)
    (ck / "step_00000010" / "model.safetensors").write_bytes(b"x")
    secret = tmp_path / "passwd"
    secret.write_text(SECRET * 100)
    pointer = ck / "latest"
    if kind == "symlink":
        pointer.symlink_to(secret)
    elif kind == "copy":
        pointer.write_text(SECRET * 100)
    elif kind == "fifo":
        os.mkfifo(pointer)  # opening it to read would block
    else:
        pointer.write_text("step_00000010" + " " * 100 + "x\n")  # a name, then more than a pointer holds
    for path in (tmp_path / "run", ck, pointer):
        with pytest.raises(ValueError) as e:
            checkpoints.resolve_checkpoint(str(path))
        assert "root:" not in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert secret.read_text() == SECRET * 100


@pytest.mark.parametrize("kind", ["symlink", "dangling", "hardlink", "fifo", "directory"])
def test_the_run_lock_is_only_ever_a_regular_file_of_its_own(tmp_path, kind):
    """OUT/.lock as a link (to a file of the user's, or dangling), a hard link, a FIFO or a directory:
    refused in one line, never opened for writing through, nothing of the target shown."""
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious"
    target.write_text(SECRET)
    lock = out / ".lock"
    if kind == "symlink":
        lock.symlink_to(target)
    elif kind == "dangling":
        lock.symlink_to(tmp_path / "created_through_the_link")
    elif kind == "hardlink":
        os.link(target, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(ValueError) as e:
        checkpoints.RunLock(str(out)).acquire()
    assert "root:" not in str(e.value) and "\n" not in str(e.value) and ".lock" in str(e.value)
    assert not isinstance(e.value, checkpoints.LockBusy)
    assert target.read_text() == SECRET
    assert not (tmp_path / "created_through_the_link").exists()


def test_a_released_lock_leaves_nothing_to_take_over(tmp_path):
    """A clean release clears the holder it recorded; a killed run's record is taken over and said;
    a lock file holding anything else is taken over without showing it."""
    lock = checkpoints.RunLock(str(tmp_path)).acquire()
    assert lock.previous == "" and (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""
    again = checkpoints.RunLock(str(tmp_path)).acquire()
    assert again.previous == ""
    again.release()
    (tmp_path / ".lock").write_text("pid 123 on host-1.example since Mon Jan  1 00:00:00 2024\n")
    stale = checkpoints.RunLock(str(tmp_path)).acquire()
    assert stale.previous == "pid 123 on host-1.example since Mon Jan  1 00:00:00 2024"
    stale.release()
    (tmp_path / ".lock").write_text(SECRET)
    odd = checkpoints.RunLock(str(tmp_path)).acquire()
    assert "root:" not in odd.previous and odd.previous
    odd.release()
