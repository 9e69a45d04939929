"""Preemption as schedulers do it (docs/reliability.md): SIGTERM or SIGINT to the whole process group (torchrun,
SLURM, Kubernetes, `timeout`), to the launcher `xla_utils.py launch` alone, or the launcher killed outright: every
rank saves the step it is at and the run resumes exactly; loader workers leave the decision to their trainer. A
rank killed outright under `--max-restarts` restarts the group, which continues from the newest checkpoint by
itself. 2 processes over gloo on the CPU, the demo's pre-train stage."""

import contextlib
import os
import signal
import subprocess
import textwrap
import time

import pytest
import torch
import webdataset as wds
from captioned import image_bytes
from runs import PY, REPO, env, free_port, losses, tiny_demo_args
from test_reliability import _latest, _wait_for_step, _weights

import data
import transforms
import xla_utils

STEPS = 16  # global batch 16 over 2 ranks


def _args(demo, out, *extra):
    return tiny_demo_args(demo, out, "--stage", "pretrain", "--set", f"pretrain.train_num_samples={16 * STEPS}", *extra)


# train.py that also writes its exit status to $STATUS_DIR/RANK
RECORDING = r"""
import os, sys
import train
status = train.main()
with open(os.path.join(os.environ["STATUS_DIR"], os.environ["RANK"]), "w") as f:
    f.write(str(status))
sys.exit(status)
"""


def _launch(args, *flags, script="train.py", **extra):
    """`xla_utils.py launch --nproc 2 [flags] SCRIPT ARGS` as a shell starts a job: in a process group of its
    own (its id is the launcher's pid)."""
    cmd = [PY, "xla_utils.py", "launch", "--nproc", "2", "--master-port", str(free_port()), *flags, script, *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _procs(marker: str) -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, command line, RANK)} of every live process whose command line holds marker (a run's
    --out: its torchrun, ranks and their loader workers)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if marker not in cmd:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                rank = next((v[5:].decode() for v in f.read().split(b"\0") if v.startswith(b"RANK=")), "")
        except OSError:  # gone meanwhile
            continue
        found[int(pid)] = (int(fields[1]), cmd, rank)
    return found


def _none_left(marker: str, timeout: float = 20) -> bool:
    deadline = time.time() + timeout
    while _procs(marker) and time.time() < deadline:
        time.sleep(0.2)
    return not _procs(marker)


def _finish(proc, out, timeout=600):
    """(status, stdout, stderr) of a launch; whatever of the run is still alive afterwards is killed, by pid."""
    try:
        o, e = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        o, e = "", "timed out"
    finally:
        for pid in [proc.pid, *_procs(str(out))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, o, e


def _assert_same_run(out, reference):
    want, got = losses(reference)[0], losses(out)[0]
    assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]  # bit for bit
    final, ref = _latest(out), _latest(reference)
    assert os.path.basename(final) == os.path.basename(ref) == f"step_{STEPS:08d}"
    a, b = _weights(final), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


@pytest.fixture(scope="module")
def two_ranks(demo_small, tmp_path_factory):
    """The uninterrupted 2-process run that stopped and resumed ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("two_ranks")
    rc, o, e = _finish(_launch(_args(demo_small, out)), out)
    assert rc == 0, o[-2000:] + e[-3000:]
    assert "device: cpu (2 process(es), DDP/gloo)" in o
    return out


def _stop_and_resume(demo, out, reference, send, sig, status):
    """Start the 2-process run, send() a stop signal once it logged step 2; every rank saves the step it
    is at (the trainers exit 128 + sig, torchrun `status`), no process of the run is left, and --resume latest
    ends bit-identical to the uninterrupted run."""
    statuses = out.parent / "statuses"
    statuses.mkdir()
    recording = out.parent / "recording_train.py"
    recording.write_text(RECORDING)
    proc = _launch(_args(demo, out, "--save-every", "1000"), script=str(recording), STATUS_DIR=statuses)
    assert _wait_for_step(proc, str(out / "metrics.jsonl"), 2)
    send(proc)
    rc, o, e = _finish(proc, out)
    assert rc == status, o[-2000:] + e[-3000:]
    assert "DataLoader worker" not in e and "Connection closed by peer" not in e
    line = next(x for x in o.splitlines() if x.startswith("stopped by"))
    assert line.startswith(f"stopped by {signal.Signals(sig).name} at step "), line
    step = int(line.split(" at step ")[1].split(";")[0])
    assert 2 <= step < STEPS and os.path.basename(_latest(out)) == f"step_{step:08d}"
    assert {f.name: f.read_text() for f in statuses.iterdir()} == {"0": str(128 + sig), "1": str(128 + sig)}
    assert _none_left(str(out))
    if reference is not None:
        rc, o, e = _finish(_launch(_args(demo, out, "--resume", "latest", "--save-every", "1000")), out)
        assert rc == 0, o[-2000:] + e[-3000:]
        assert any(x.startswith("resuming from") and f"(step {step}, " in x for x in o.splitlines()), o[-2000:]
        _assert_same_run(out, reference)


# torchrun turns the signal it got into an uncaught SignalException: exit status 1, whatever its ranks did
TORCHRUN_STOPPED = 1


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_then_resumes(demo_small, two_ranks, tmp_path):
    """`kill -TERM -- -PGID` (torchrun, SLURM, Kubernetes, `timeout`): the loader workers get it too, and
    leave the stop to their trainer instead of dying under it."""
    _stop_and_resume(
        demo_small,
        tmp_path / "run",
        two_ranks,
        lambda p: os.killpg(p.pid, signal.SIGTERM),
        signal.SIGTERM,
        TORCHRUN_STOPPED,
    )


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_rank(demo_small, two_ranks, tmp_path):
    """SIGTERM to `xla_utils.py launch` alone: it passes it to torchrun and waits, instead of dying and
    leaving torchrun and the ranks training on as orphans."""
    _stop_and_resume(
        demo_small,
        tmp_path / "run",
        two_ranks,
        lambda p: p.send_signal(signal.SIGTERM),
        signal.SIGTERM,
        TORCHRUN_STOPPED,
    )


@pytest.mark.slow
def test_sigterm_to_every_process_of_the_job_saves(demo_small, tmp_path):
    """SLURM and systemd signal every process of a job: the launcher, torchrun, the ranks and their loader
    workers. The ranks get it twice (directly and from torchrun) and still save; the workers ignore it."""
    out = tmp_path / "run"

    def everyone(p):
        subprocess.run(["kill", "-TERM", str(p.pid), *map(str, _procs(str(out)))], check=False)

    _stop_and_resume(demo_small, out, None, everyone, signal.SIGTERM, TORCHRUN_STOPPED)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_ctrl_c_or_a_killed_launcher_saves(demo_small, tmp_path, how):
    """Ctrl-C (SIGINT to the launcher's group): the ranks get SIGINT, save and exit 130. The launcher
    SIGKILLed: torchrun gets SIGTERM (the launcher's death signal), the ranks save and nothing is left."""
    if how == "sigint":
        _stop_and_resume(
            demo_small,
            tmp_path / "run",
            None,
            lambda p: os.killpg(p.pid, signal.SIGINT),
            signal.SIGINT,
            TORCHRUN_STOPPED,
        )
    else:
        _stop_and_resume(demo_small, tmp_path / "run", None, lambda p: p.kill(), signal.SIGTERM, -signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_which_resumes_by_itself(demo_small, two_ranks, tmp_path):
    """`launch --max-restarts 1`: rank 1 SIGKILLed after the checkpoint of step 3; torchrun stops rank 0,
    starts both again with the same command, they resume from the newest checkpoint and the run ends
    with the uninterrupted run's losses and weights, nobody typing anything."""
    out = tmp_path / "run"
    proc = _launch(_args(demo_small, out, "--resume", "auto"), "--max-restarts", "1")
    assert _wait_for_step(proc, str(out / "metrics.jsonl"), 5)
    ranks = [
        pid
        for pid, (ppid, _, rank) in _procs(str(out)).items()
        if rank == "1" and "torch.distributed.run" in _procs(str(out)).get(ppid, (0, "", ""))[1]
    ]
    assert len(ranks) == 1, _procs(str(out))
    os.kill(ranks[0], signal.SIGKILL)
    rc, o, e = _finish(proc, out)
    assert rc == 0, o[-2000:] + e[-3000:]
    assert "resuming from" in o
    _assert_same_run(out, two_ranks)
    assert _none_left(str(out))


# ----------------------------------------------------------------------------- the launcher alone

CHILD = r"""
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
print("ready", flush=True)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1)  # a save; more signals may come meanwhile
print(f"got {len(got)}", flush=True)
sys.exit(128 + got[0] if got else 0)
"""


@pytest.mark.slow
def test_the_launcher_passes_one_stop_signal_and_returns_the_status(tmp_path):
    """`timeout` signals its child and then its whole group, a scheduler the group: the launched command
    (its own process group) gets the signal once, through the launcher, which waits for it and returns its
    status."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    code = textwrap.dedent(f"""
        import sys, xla_utils
        sys.exit(xla_utils.run_launched([sys.executable, {str(child)!r}], {{}}))
    """)
    p = subprocess.Popen(
        [PY, "-c", code], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert p.stdout.readline() == "ready\n"
        os.kill(p.pid, signal.SIGTERM)
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(timeout=60) == 143
        assert p.stdout.read() == "got 1\n"
    finally:
        p.kill()
        p.wait()


def test_launch_passes_max_restarts_to_torchrun(capsys):
    cmd, _ = xla_utils.launch_command("train.py", ["--cfg", "demo"], device="cpu", nproc=2, max_restarts=3)
    assert "--max-restarts=3" in cmd[: cmd.index("train.py")]
    cmd, _ = xla_utils.launch_command("train.py", [], device="cpu")
    assert not any(c.startswith("--max-restarts") for c in cmd)
    # torch 2.9 hands a restarted group under the static rendezvous, or a shared c10d store, stale addresses
    cmd, extra = xla_utils.launch_command("train.py", [], device="cpu", max_restarts=1)
    assert "--rdzv_backend=c10d" in cmd and extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    with pytest.raises(ValueError, match="max-restarts needs the c10d rendezvous"):
        xla_utils.launch_command("train.py", [], device="cpu", max_restarts=1, rdzv_backend="static")
    with pytest.raises(ValueError, match="max-restarts"):
        xla_utils.launch_command("train.py", [], device="xla", max_restarts=1)
    assert xla_utils.main(["launch", "--print-only", "--max-restarts", "2", "train.py"]) == 0
    assert "--max-restarts=2" in capsys.readouterr().out
    assert xla_utils.main(["launch", "--max-restarts", "-1", "train.py"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-restarts")


# ----------------------------------------------------------------------------- loader workers


def _children() -> set[int]:
    me, kids = str(os.getpid()), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    kids.add(int(pid))
        except OSError:
            continue
    return kids


FAILS_WITH_WORKERS = r"""
import sys
import data
batches = iter(data.make_train_loader(sys.argv[1], None, 32, 4, num_workers=2, shuffle_buffer=4))
next(batches)
raise RuntimeError("a bug in the trainer")
"""


@pytest.mark.slow
def test_a_trainer_that_fails_ends_its_workers(tmp_path):
    """An error in the trainer with workers alive: at exit multiprocessing ends them with SIGTERM from their
    parent, which they obey (they ignore everyone else's), and the process ends instead of waiting forever."""
    _write_shard(tmp_path / "00000.tar")
    p = subprocess.run(
        [PY, "-c", FAILS_WITH_WORKERS, str(tmp_path / "00000.tar")],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and p.stderr.rstrip().endswith("RuntimeError: a bug in the trainer"), p.stderr[-2000:]


def _wait_until_signals_blocked(pids, timeout=30.0):
    """Until each process blocks SIGTERM and SIGINT (a loader worker's first act, worker_init): a worker
    still starting on a loaded machine would otherwise meet the signal with torch's default handler."""
    want = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            with open(f"/proc/{pid}/status") as f:
                blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
            if blocked & want == want:
                break
            assert time.monotonic() < deadline, f"worker {pid} never blocked the stop signals"
            time.sleep(0.05)


def _write_shard(path):
    with wds.TarWriter(str(path)) as w:
        for j in range(48):
            w.write({"__key__": f"{j:06d}", "jpg": image_bytes(j), "txt": f"caption {j}"})


def test_loader_workers_outlive_stop_signals(tmp_path):
    """SIGTERM and SIGINT to the loader workers (a signal to the trainer's process group, or to every process
    of a job, reaches them too): they go on, the trainer decides, and the batches are those of an undisturbed
    loader."""
    _write_shard(tmp_path / "00000.tar")
    kw = dict(num_workers=2, shuffle_buffer=4, seed=1, repeat=False)
    spec = str(tmp_path / "00000.tar")
    want = [caps for _, caps in data.make_train_loader(spec, None, 32, 4, **kw)]
    before = _children()
    batches = iter(data.make_train_loader(spec, None, 32, 4, **kw))
    got = [next(batches)[1]]
    workers = _children() - before
    assert len(workers) == 2, workers
    _wait_until_signals_blocked(workers)
    for sig in ("-TERM", "-INT"):  # from another process, as a scheduler's (their parent's own SIGTERM ends them)
        subprocess.run(["kill", sig, *map(str, workers)], check=True)
    time.sleep(0.5)
    got += [caps for _, caps in batches]
    assert got == want


def test_eval_loader_workers_outlive_stop_signals(tmp_path):
    """The same for the evaluation loaders (an eval set during training): a stop signal to the process group
    does not kill their workers mid-evaluation."""
    folder = tmp_path / "val"
    for i in range(12):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 3}" / f"{i}.jpg").write_bytes(image_bytes(i))

    def labels(loader):
        return [y.tolist() for _, y in loader]

    want = labels(data.make_eval_loader(str(folder), transforms.eval_transform(16), 2, num_workers=2)[0])
    before = _children()
    batches = iter(data.make_eval_loader(str(folder), transforms.eval_transform(16), 2, num_workers=2)[0])
    got = [next(batches)[1].tolist()]
    workers = _children() - before
    assert len(workers) == 2, workers
    _wait_until_signals_blocked(workers)
    for sig in ("-TERM", "-INT"):
        subprocess.run(["kill", sig, *map(str, workers)], check=True)
    time.sleep(0.5)
    got += labels(batches)
    assert got == want
