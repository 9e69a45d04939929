"""xla_utils.py: device choice, launcher commands, the runtime class of each device, RNG state round trips,
host memory reuse."""

import os
import random
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import xla_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_device_is_not_xla_just_because_torch_xla_imports(monkeypatch):
    """docs/platforms.md: torch_xla imports here (conftest) and PJRT_DEVICE=CPU is set, yet with
    no GPU and no TPU 'auto' must mean the plain CPU; XLA only when asked or a TPU is attached."""
    import torch_xla  # noqa: F401

    assert os.environ.get("PJRT_DEVICE") == "CPU"
    assert xla_utils.resolve_device("auto") == "cpu"
    assert xla_utils.resolve_device("xla") == "xla"
    assert xla_utils.resolve_device("CPU") == "cpu"
    monkeypatch.setenv("PJRT_DEVICE", "TPU")  # a TPU VM sets this
    assert xla_utils.resolve_device("auto") == "xla"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        xla_utils.resolve_device("cuda")
    with pytest.raises(ValueError, match="choose one of auto, cuda, xla, cpu"):
        xla_utils.resolve_device("tpu")


def test_launch_commands(capsys):
    cmd, env = xla_utils.launch_command("train.py", ["--cfg", "demo"], device="cpu", nproc=2)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert cmd[-5:] == ["train.py", "--device", "cpu", "--cfg", "demo"]
    assert env["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))
    cmd, env = xla_utils.launch_command("train.py", ["--cfg", "h14_v2"], device="xla")
    assert cmd[1:] == ["train.py", "--device", "xla", "--cfg", "h14_v2"] and env["PJRT_DEVICE"] == "CPU"
    with pytest.raises(ValueError, match="one process per host"):
        xla_utils.launch_command("train.py", [], device="xla", nproc=4)
    # the CLI: --print-only, and one-line errors (the real 2-process launch runs in
    # test_train.py::test_torchrun_two_processes_match_one)
    assert xla_utils.main(["launch", "--print-only", "--nproc", "2", "train.py", "--cfg", "demo"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run --nproc_per_node=2" in out and out.rstrip().endswith(
        "train.py --device cpu --cfg demo"
    )
    assert xla_utils.main(["launch", "nope.py"]) == 2
    assert capsys.readouterr().err == "error: script not found: nope.py\n"
    # printed commands are shell-quoted: a brace pattern or a space survives the paste
    args = ["--train-data", "/data/{00000..00009}.tar", "--out", "my runs/a"]
    assert xla_utils.main(["launch", "--print-only", "train.py", *args]) == 0
    assert shlex.split(capsys.readouterr().out)[-4:] == args


def test_init_runtime_starts_the_device_class():
    rt = xla_utils.init_runtime("cpu")
    assert type(rt) is xla_utils.CpuRuntime and rt.kind == "cpu" and rt.device == torch.device("cpu")
    assert (rt.rank, rt.world_size, rt.num_devices, rt.is_master) == (0, 1, 1, True)
    assert not (rt.distributed or rt.spmd) and rt.mesh is None
    assert rt.describe() == "device: cpu (1 process(es))"


def test_what_differs_between_devices_comes_from_their_classes():
    """Each device's class answers for itself (no GPU or TPU needed to ask what it would use)."""
    host = torch.device("cpu")
    cpu = xla_utils.CpuRuntime(host)
    cuda = xla_utils.CudaRuntime(host)
    xla = xla_utils.XlaRuntime(host)
    assert [rt.kind for rt in (cpu, cuda, xla)] == ["cpu", "cuda", "xla"]
    assert (cpu.precision(), cuda.precision(), xla.precision()) == ("fp32", "bf16", "fp32")
    assert cuda.precision("fp32") == "fp32" and cpu.precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        cpu.precision("fp16")
    assert cpu.optimizer_kwargs() == cuda.optimizer_kwargs() == {"fused": True}
    assert xla.optimizer_kwargs() == {"capturable": True}
    assert xla.count_dtype == torch.int32 and cpu.count_dtype == cuda.count_dtype == torch.int64
    assert cuda.pin_memory and not cpu.pin_memory and not xla.pin_memory
    assert xla.compile_count() >= 0 and cpu.compile_count() is None
    assert cpu.agree(True) and not cpu.agree(False)  # one process: its own decision
    assert cpu.agree_each([True, False]) == xla.agree_each([True, False]) == [True, False]
    assert cpu.all_gather_object({"a": 1}) == xla.all_gather_object({"a": 1}) == [{"a": 1}]


def test_only_the_cpu_runs_its_compiled_step_deterministically():
    before = torch.are_deterministic_algorithms_enabled()
    with xla_utils.CpuRuntime(torch.device("cpu")).deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with xla_utils.CudaRuntime(torch.device("cpu")).deterministic():
        assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.slow
def test_torch_xla_is_not_imported_with_the_module():
    """Importing xla_utils (and starting a CPU runtime) leaves torch_xla unimported: it costs
    seconds, and TensorFlow must be imported after it (import_tensorflow)."""
    code = "import sys, xla_utils\nxla_utils.init_runtime('cpu')\nprint('torch_xla' in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"]


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    rt = xla_utils.init_runtime("cpu")
    rt.seed(7)
    state = rt.rng_state()
    checkpoints.save_state(state, str(tmp_path / "rng.pt"))
    want = (random.random(), np.random.rand(), torch.rand(3))
    rt.seed(99)
    rt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


@pytest.mark.slow
def test_a_cpu_runtime_reuses_freed_memory_instead_of_faulting_it_in_again():
    """glibc returns a freed 100 MB block (B/16's token-embedding gradient) to the OS, and the next
    step page-faults all of it in again; a CPU runtime keeps it for reuse (counted in minor page
    faults, in fresh processes: the setting is process-wide). Over the first steps the heap may still
    grow where its layout blocks reuse (up to the 5th step, in 30 runs of the CPU runtime), so 8 steps
    come first; then a bound, not zero, per 10 steps."""
    code = (
        "import resource, sys, torch, xla_utils\n"
        "if sys.argv[1] == 'runtime': xla_utils.init_runtime('cpu')\n"
        "for _ in range(8): torch.zeros(49408, 512)\n"  # the heap settles
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10): torch.zeros(49408, 512)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {}
    for how in ("plain", "runtime"):
        r = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr
        faults[how] = int(r.stdout.split()[-1])
    assert faults["plain"] >= 10 * 49408 * 512 * 4 // 2**21  # afresh: at least a fault per 2 MB page
    assert faults["runtime"] < faults["plain"] // 4, faults  # plain: a refill every step
