"""One small runtime API over CUDA (torchrun/DDP), XLA (PJRT, SPMD data parallel) and CPU.

Everything that differs between CUDA, XLA and CPU lives here, so that no other module branches on
the device: a Runtime base class holds what they share (who this process is among the data ranks,
the torch.distributed collectives of CUDA/CPU processes) and CpuRuntime, CudaRuntime and
XlaRuntime each override what differs (precision, autocast, step boundary, optimizer flags,
checkpointed state, RNG state, pinned memory, decisions every host agrees on). Beside them: device
detection, the TensorFlow-after-torch_xla import order, and the launcher.

Device choice (docs/platforms.md): from what the user asked (--device auto|cuda|xla|cpu) and what
the machine has. "torch_xla imports" is NOT a reason to use XLA: auto picks CUDA when a GPU is
visible, XLA only when a TPU is attached (or PJRT_DEVICE=TPU), else the CPU.

Multi-device XLA uses SPMD (one process per host, the global batch sharded over a 1-D 'data' mesh):
the compiler inserts the collectives. Multi-process PJRT collectives abort on the CPU client
(docs/platforms.md), SPMD runs there: the TPU path is the one tested on 2 CPU devices.

CLI:  python xla_utils.py launch [--nproc N] [--device ...] SCRIPT ARGS...
      python xla_utils.py info
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import glob
import importlib.util
import io
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

import cli

DEVICES = ("auto", "cuda", "xla", "cpu")
PRECISIONS = ("auto", "fp32", "bf16")
# --shard: "none" replicates parameters, gradients and optimizer states on every device (DDP, or
# SPMD with replicated parameters); "fsdp" shards them (FSDP2 fully_shard on CUDA/CPU, parameters
# sharded over the SPMD mesh on XLA)
SHARDING = ("none", "fsdp")


@functools.cache
def _torch_xla() -> types.SimpleNamespace:
    """torch_xla's modules, imported on first use and never with this module: the import takes
    seconds, and TensorFlow must come after it (import_tensorflow). Raises ImportError without it."""
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as metrics
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    from torch_xla._internal import tpu
    from torch_xla.utils.checkpoint import checkpoint

    return types.SimpleNamespace(
        torch_xla=torch_xla, xm=xm, xr=xr, xs=xs, metrics=metrics, tpu=tpu, checkpoint=checkpoint
    )


# ----------------------------------------------------------------------------- device detection


def tpu_attached() -> bool:
    """True when a TPU is visible (without initialising any runtime)."""
    if os.environ.get("PJRT_DEVICE", "").upper() == "TPU":
        return True
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return False
    try:
        return _torch_xla().tpu.num_available_chips() > 0
    except Exception:  # torch_xla missing or no libtpu
        return False


def resolve_device(requested: str = "auto") -> str:
    """'auto'|'cuda'|'xla'|'cpu' -> the kind of runtime to start; raises ValueError if unavailable."""
    requested = requested.lower() if requested else "auto"
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "xla" if tpu_attached() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    if requested == "xla":
        try:
            _torch_xla()
        except ImportError as e:
            raise ValueError(f"--device xla asked for, but torch_xla does not import ({e})") from None
    return requested


# ----------------------------------------------------------------------------- device-specific helpers

# A process that will never use XLA may set this to False (data.py's CLI does): TensorFlow is then
# imported without first importing torch_xla, which saves seconds.
TF_AFTER_XLA = True


def import_tensorflow():
    """TensorFlow, imported after torch_xla when that is installed: the reverse order aborts the
    process with an LLVM option clash (docs/platforms.md), so a later torch_xla import (an XLA
    run, an XLA eval) stays possible."""
    xla_first = TF_AFTER_XLA and "tensorflow" not in sys.modules and "torch_xla" not in sys.modules
    if xla_first and importlib.util.find_spec("torch_xla") is not None:
        os.environ.setdefault("PJRT_DEVICE", "CPU")
        _torch_xla()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def reuse_freed_memory():
    """CPU runs (glibc): keep freed memory for the next step, as CUDA's caching allocator does, not
    page-fault it in afresh (B/16's 100 MB token-embedding gradient: 36 ms a step so, 3 ms reused)."""
    m_trim_threshold = -1
    m_mmap_max = -4
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_max, 0)  # large blocks from the heap, not from mmap (unmapped when freed)
        libc.mallopt(m_trim_threshold, 2**31 - 1)  # the heap's free top stays mapped


def grad_checkpoint(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) with its activations recomputed in the backward pass (gradient checkpointing). XLA
    needs its own variant: the compiler would otherwise fold the recomputation away (CSE)."""
    if x.device.type == "xla":
        return _torch_xla().checkpoint(fn, x)
    return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP's sharding units, innermost first: every transformer block (an element of a ModuleList
    named `resblocks`), then each child of the model that holds blocks (the towers: their own
    forward, e.g. encode_image in the zero-shot eval, gathers their remaining parameters). The
    root's own parameters (logit_scale) form the last unit, fully_shard(model)."""
    blocks = [m for n, m in model.named_modules() if re.fullmatch(r"(.+\.)?resblocks\.\d+", n)]
    ids = {id(b) for b in blocks}
    towers = [c for c in model.children() if any(id(m) in ids for m in c.modules())]
    return blocks + towers


def to_cpu(obj, fetch=None):
    """A nest of dicts / lists / tensors with every tensor on the host (for torch.save); each
    tensor passes through fetch(tensor) first when given."""
    if torch.is_tensor(obj):
        if fetch is not None:
            obj = fetch(obj)
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v, fetch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, fetch) for v in obj)
    return obj


def _host_state(model: torch.nn.Module, optimizer, fetch=None) -> tuple[dict, dict]:
    """(weights, optimizer state) with every tensor on the host, through fetch(tensor) when given."""
    model = getattr(model, "module", model)  # the model inside DDP
    weights = {k: to_cpu(v, fetch).contiguous().clone() for k, v in model.state_dict().items()}
    return weights, to_cpu(optimizer.state_dict(), fetch)


def _tuplify(x):
    """Lists back to the tuples random.setstate wants (a checkpoint may hold either)."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuplify(v) for v in x)
    return x


# ----------------------------------------------------------------------------- the runtime


@dataclass
class Runtime:
    """What every device shares: who this process is among the data ranks, and the collectives of
    a torch.distributed process group (CUDA and CPU processes under torchrun; each a no-op in one
    process). A subclass per device holds what differs; init_runtime starts the right one."""

    kind: ClassVar[str]  # "cuda" | "xla" | "cpu"
    default_precision: ClassVar[str] = "fp32"  # what precision("auto") means here
    count_dtype: ClassVar[torch.dtype] = torch.int64  # integer dtype for exact counters on the device
    pin_memory: ClassVar[bool] = False  # page-locked host batches: asynchronous copies to the device

    device: torch.device
    rank: int = 0  # data rank: which slice of the data this process reads
    world_size: int = 1  # number of data ranks (processes)
    local_rank: int = 0
    num_devices: int = 1  # devices taking part (XLA SPMD: all devices of all hosts)
    distributed: bool = False  # torch.distributed process group (CUDA/CPU multi-process)
    mesh: object = None  # XLA SPMD mesh (None: one device, or not XLA)

    @classmethod
    def start(cls) -> Runtime:
        """The runtime of this process (init_runtime calls it): a subclass's."""
        raise NotImplementedError

    @classmethod
    def _join_torchrun(cls, device: torch.device, backend: str) -> Runtime:
        """This process of a torchrun launch (its RANK, WORLD_SIZE and LOCAL_RANK; one process
        without them), in the process group of all of them when there are several."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        distributed = world_size > 1
        if distributed and not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(
            device,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            num_devices=world_size,
            distributed=distributed,
        )

    # -- identity
    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def spmd(self) -> bool:
        return self.mesh is not None

    @property
    def _grouped(self) -> bool:
        """Several processes in a torch.distributed process group: collectives have work to do."""
        return self.distributed and self.world_size > 1

    def describe(self) -> str:
        """One line for the run log: the device and how the processes share the work."""
        raise NotImplementedError

    def precision(self, requested: str = "auto") -> str:
        """'auto' -> this device's default (bf16 autocast on CUDA, fp32 elsewhere); 'fp32' / 'bf16'
        as asked."""
        if requested == "auto":
            return self.default_precision
        if requested not in PRECISIONS:
            raise ValueError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
        return requested

    def optimizer_kwargs(self) -> dict:
        """Flags for torch.optim.AdamW: the fused kernel (on the CPU 5x foreach's speed on B/16,
        launch/bench_step.py --optimizers)."""
        return {"fused": True}

    # -- collectives
    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_gather_with_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Features of the whole global batch, autograd flowing back to every rank; also returns
        this rank's row offset (labels = arange(b) + offset). Under SPMD the tensor already is the
        global batch (the compiler does the gather), so it is returned as is with offset 0."""
        if not self._grouped:
            return x, 0
        # functional collective: traceable by torch.compile; its backward is a reduce-scatter
        # (sum), i.e. each rank gets the gradient of every rank's loss w.r.t. its own rows
        gathered = fc.all_gather_tensor_autograd(x.contiguous(), 0, dist.group.WORLD)
        return gathered, self.rank * x.shape[0]

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over data ranks (in place for DDP; a no-op single process or SPMD)."""
        if self._grouped:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= self.world_size
        return x

    def mean_over_ranks(self, value: float) -> float:
        """Mean of a host number over data ranks (logging)."""
        if not self._grouped:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / self.world_size

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every process (torch.distributed's
        all_gather_object); [obj] in one process."""
        if not self._grouped:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_on_device(self, flag: torch.Tensor) -> torch.Tensor:
        """A device flag (bool scalar) that is true on every process if it is true on any of them,
        without the host reading it: an all-reduce(max) queued on the device (under SPMD the step's
        values already are the global batch's)."""
        if not self._grouped:
            return flag
        t = flag.to(self.count_dtype)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t > 0

    def agree(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any of them (see agree_each)."""
        return self.agree_each([flag])[0]

    def agree_each(self, flags: list[bool]) -> list[bool]:
        """Element-wise any() of `flags` over all processes, in one collective. Decisions that gate
        a collective (a time-based save, a stop on a signal or a non-finite loss) must go through
        here: processes that disagree would deadlock. torch.distributed: an all-reduce(max)."""
        if not self._grouped:
            return [bool(f) for f in flags]
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    # -- model and data placement
    def wrap_model(self, model: torch.nn.Module, shard: str = "none", precision: str = "fp32") -> torch.nn.Module:
        """What the step calls. One process: the model itself. Several, shard 'none': DDP. Several,
        shard 'fsdp': FSDP2 `fully_shard` per transformer block (fsdp_units), per tower and at the
        root, in place (the model becomes its FSDP module; build the optimizer afterwards; scalar
        parameters stay replicated, see _fully_shard). XLA: see XlaRuntime.wrap_model."""
        if shard not in SHARDING:
            raise ValueError(f"unknown sharding {shard!r}; choose {', '.join(SHARDING)}")
        if not self._grouped:
            return model
        if shard == "fsdp":
            return self._fully_shard(model, precision)
        return DistributedDataParallel(model, device_ids=self._ddp_device_ids(), broadcast_buffers=False)

    def _ddp_device_ids(self) -> list[int] | None:
        return None

    def _fsdp_policy(self, precision: str) -> MixedPrecisionPolicy:
        """FSDP2's dtypes: the parameters' own, for the compute and for the gradient reduction."""
        return MixedPrecisionPolicy()

    def _fully_shard(self, model: torch.nn.Module, precision: str) -> torch.nn.Module:
        policy = self._fsdp_policy(precision)
        for unit in fsdp_units(model):
            fully_shard(unit, mp_policy=policy)
        # FSDP2 refuses scalar parameters (logit_scale): they stay replicated, their gradient
        # averaged over the ranks after each accumulation (mean(a) + b averages to mean(a + b),
        # so several backward passes per step are fine), as DDP would
        scalars = {p for p in model.parameters() if p.dim() == 0}
        for p in scalars:
            p.register_post_accumulate_grad_hook(self._average_grad)
        return fully_shard(model, mp_policy=policy, ignored_params=scalars)

    def _average_grad(self, param: torch.Tensor):
        self.all_reduce_mean(param.grad)

    def full_state(self, model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
        """(weights, optimizer state) as full host tensors on the master, ({}, {}) on the other
        ranks. Collective (every rank calls it) for an FSDP model: torch.distributed.checkpoint's
        full state dicts, the optimizer's keyed by parameter name."""
        if isinstance(model, FSDPModule):
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(model, options=options)
            optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
            return weights, optimizer_state
        if not self.is_master:
            return {}, {}
        return _host_state(model, optimizer)

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict):
        """The inverse of full_state's optimizer state (every rank passes the full state; an FSDP
        model keeps its shard of it, through set_optimizer_state_dict)."""
        if isinstance(model, FSDPModule):
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Host batch -> device."""
        return [t.to(self.device) for t in tensors]

    def device_batches(self, batches: Iterator, loader) -> DeviceBatches:
        """The training loop's feed: the loader's batches on the device (see DeviceBatches). Here
        (the CPU) the host is the device: each batch passes through as it is."""
        return DeviceBatches(self, batches, loader)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, drop: torch.Tensor):
        """optimizer.step(), dropped on the device where the bool scalar `drop` is true: no host read.
        Fused AdamW takes it as `found_inf` (as GradScaler passes it): the weights, both moments and
        the step count stay as they were, weight decay included; with drop false its result is the
        plain step's, bit for bit. An optimizer that takes no found_inf (an unfused one, SGD) is
        decided on the host instead: one read of `drop`."""
        if not optimizer.defaults.get("fused"):
            if not bool(drop):
                optimizer.step()
            return
        optimizer.found_inf = drop.to(torch.float32)
        optimizer.grad_scale = None
        optimizer.step()

    # -- step boundary and compilation
    def step_boundary(self):
        """End of one training step (XLA cuts and runs the traced graph here; eager elsewhere)."""

    def add_step_closure(self, fn, args=()):
        """Run fn(*args) once the step's values exist on the host: at once, eager devices."""
        fn(*args)

    def compile(self, fn):
        """torch.compile(fn), static shapes (fixed keep-counts and context: one graph per stage)."""
        return torch.compile(fn, dynamic=False)

    def compile_count(self) -> int | None:
        """Number of XLA graph compilations so far (None off XLA)."""
        return None

    def deterministic(self):
        """Context manager for the compiled step: deterministic kernels where this device needs
        them to make a resumed run repeat an uninterrupted one (see CpuRuntime)."""
        return contextlib.nullcontext()

    def autocast(self, precision: str):
        """Context manager for the forward pass: bf16 autocast or nothing (fp32)."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.kind, dtype=torch.bfloat16)

    # -- timing and memory
    def synchronize(self):
        """Wait for queued device work (timing only)."""

    def reset_peak_memory(self):
        """Start a new peak for peak_memory."""

    def peak_memory(self) -> int | None:
        """Bytes the device allocator held at most since reset_peak_memory (CUDA; None elsewhere)."""
        return None

    def release_memory(self):
        """Return cached device memory (between benchmark models that do not fit side by side)."""

    # -- seeds and RNG state
    def seed(self, seed: int):
        """Seed python, numpy and torch."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def rng_state(self) -> dict:
        """RNG states as plain types / tensors (loadable with torch.load(weights_only=True))."""
        st = np.random.get_state()
        numpy_state = {
            "keys": torch.from_numpy(st[1].astype(np.int64)),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "cached_gaussian": float(st[4]),
        }
        return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}

    def set_rng_state(self, state: dict):
        random.setstate(_tuplify(state["python"]))
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])

    def shutdown(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class CpuRuntime(Runtime):
    """The CPU: one process, or several under torchrun (gloo)."""

    kind = "cpu"
    backend = "gloo"

    @classmethod
    def start(cls) -> CpuRuntime:
        reuse_freed_memory()
        return cls._join_torchrun(torch.device("cpu"), cls.backend)

    def describe(self) -> str:
        ddp = ", DDP/gloo" if self.distributed else ""
        return f"device: cpu ({self.world_size} process(es){ddp})"

    @contextlib.contextmanager
    def deterministic(self):
        """torch.use_deterministic_algorithms inside: a compiled step's parallel scatter-adds
        otherwise sum in a varying order. (Not on CUDA, where cuBLAS would then need
        CUBLAS_WORKSPACE_CONFIG, nor XLA, its own compiler.)"""
        det = torch.utils.deterministic
        was_enabled = torch.are_deterministic_algorithms_enabled()
        was_filling = det.fill_uninitialized_memory
        det.fill_uninitialized_memory = False  # no NaN-filling of every empty()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_enabled)
            det.fill_uninitialized_memory = was_filling


@dataclass
class CudaRuntime(Runtime):
    """One GPU per process, several processes under torchrun (DDP or FSDP2 over nccl); bf16
    autocast by default; host batches page-locked and copied asynchronously."""

    kind = "cuda"
    backend = "nccl"
    default_precision = "bf16"
    pin_memory = True

    @classmethod
    def start(cls) -> CudaRuntime:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return cls._join_torchrun(torch.device("cuda", local_rank), cls.backend)

    def describe(self) -> str:
        ddp = ", DDP/nccl" if self.distributed else ""
        return f"device: cuda ({torch.cuda.get_device_name(self.device)}; {self.world_size} process(es){ddp})"

    def _ddp_device_ids(self) -> list[int]:
        return [self.local_rank]

    def _fsdp_policy(self, precision: str) -> MixedPrecisionPolicy:
        """bf16: the parameters compute in bf16 and their gradients reduce in fp32."""
        if precision != "bf16":
            return super()._fsdp_policy(precision)
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def device_batches(self, batches: Iterator, loader) -> DeviceBatches:
        """The next batch copied from pinned memory on a side stream while the current step runs."""
        return CudaBatches(self, batches, loader)

    def synchronize(self):
        torch.cuda.synchronize(self.device)

    def reset_peak_memory(self):
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def release_memory(self):
        torch.cuda.empty_cache()

    def rng_state(self) -> dict:
        state = super().rng_state()
        state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict):
        super().set_rng_state(state)
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


@dataclass
class XlaRuntime(Runtime):
    """XLA through PJRT (TPU; the CPU client in tests): one process per host. With several devices,
    SPMD over a 1-D 'data' mesh of every device of every host: the step is one program for the
    global batch and the compiler inserts the collectives, so the torch.distributed ones have no
    work; decisions and objects shared between hosts travel through the mesh (_sum_over_hosts).
    The step is traced and runs at step_boundary; counters are int32 (TPUs have no fast 64-bit
    integers)."""

    kind = "xla"
    count_dtype = torch.int32

    def __post_init__(self):
        self.xla = _torch_xla()

    @classmethod
    def start(cls) -> XlaRuntime:
        """Every addressable device, through SPMD when there are several (must run before any XLA
        tensor exists)."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "XLA runs one process per host (SPMD); do not start it with torchrun "
                "(use: python xla_utils.py launch SCRIPT ...)"
            )
        xla = _torch_xla()
        n = xla.xr.global_runtime_device_count()
        mesh = None
        if n > 1:
            xla.xr.use_spmd()
            mesh = xla.xs.Mesh(np.arange(n), (n,), ("data",))
        return cls(
            xla.torch_xla.device(),
            rank=xla.xr.process_index(),
            world_size=xla.xr.process_count(),
            num_devices=n,
            mesh=mesh,
        )

    @property
    def _multi_host(self) -> bool:
        return self.spmd and self.world_size > 1

    def describe(self) -> str:
        how = "1 device"
        if self.spmd:
            how = f"SPMD data parallel over {self.num_devices} devices, {self.world_size} host process(es)"
        return f"device: xla ({self.xla.xr.device_type()}, PJRT, {how})"

    def optimizer_kwargs(self) -> dict:
        """capturable: AdamW's step count and bias corrections stay on the device (no per-step host
        scalars in the graph)."""
        return {"capturable": True}

    def optimizer_step(self, optimizer: torch.optim.Optimizer, drop: torch.Tensor):
        """torch_xla has no fused AdamW: the step runs and each parameter and state tensor is then
        selected between its new and its old value in the same graph (a select the compiler fuses
        into the update; the old values are the graph's inputs anyway). A state created by this
        step is zero before it: a dropped first step leaves AdamW as if it had not run."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        old = {id(p): p.detach().clone() for p in params}
        old_state = {
            (id(p), k): v.detach().clone() for p in params for k, v in optimizer.state[p].items() if torch.is_tensor(v)
        }
        optimizer.step()
        with torch.no_grad():
            for p in params:
                p.copy_(torch.where(drop, old[id(p)], p))
                for k, v in optimizer.state[p].items():
                    if torch.is_tensor(v):
                        before = old_state.get((id(p), k))
                        v.copy_(torch.where(drop, torch.zeros_like(v) if before is None else before, v))

    # -- collectives between hosts, through the mesh
    def barrier(self):
        if self._multi_host:
            # a cross-host reduction returns once every host joined; under SPMD xm.rendezvous sees
            # one replica (it returns this host's payload alone), so it need not wait for the others
            self._sum_over_hosts(torch.zeros(1, dtype=torch.int32))

    def all_gather_object(self, obj) -> list:
        """Multi-host: obj's torch.save bytes go through the mesh (_gather_over_mesh), so obj holds
        what torch.load(weights_only=True) reads: plain types and tensors (RNG and loader states).
        One host: [obj]."""
        if self._multi_host:
            return self._gather_over_mesh(obj)
        return [obj]

    def agree_each(self, flags: list[bool]) -> list[bool]:
        """Multi-host: the sum over hosts of the flags (_sum_over_hosts: one reduction over the
        mesh, the same result on every host)."""
        if not self._multi_host:
            return [bool(f) for f in flags]
        counts = self._sum_over_hosts(torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32))
        return [v > 0 for v in counts.tolist()]

    def _gather_over_mesh(self, obj) -> list:
        """all_gather_object over the SPMD mesh: every host's byte count, then every host's bytes
        (as int32 words, in its own row), each through one _sum_over_hosts."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()

        def slot(x):  # x in this host's row, zeros in the others
            rows = torch.zeros(self.world_size, *x.shape, dtype=torch.int32)
            rows[self.rank] = x
            return rows

        sizes = self._sum_over_hosts(slot(torch.tensor(len(data))))
        longest = -(-int(sizes.max()) // 4)  # int32 words of the longest
        words = 1 << (longest - 1).bit_length()  # rounded up to a power of two: few graphs
        mine = np.frombuffer(data.ljust(4 * words, b"\0"), dtype=np.int32)
        rows = self._sum_over_hosts(slot(torch.from_numpy(mine.copy())))
        gathered = []
        for row, size in zip(rows, sizes.tolist()):
            # weights_only: the bytes are data, never unpickled as code
            gathered.append(torch.load(io.BytesIO(row.numpy().tobytes()[:size]), weights_only=True))
        return gathered

    def _sum_over_hosts(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-host SPMD: the sum over hosts of each host's int32 host tensor x, read back on
        every host; one collective. Each host passes x on its first device and zeros on its others
        as its rows of a batch-sharded [num_devices, *x.shape] tensor (to_device); the sum over
        dimension 0, marked replicated, is an all-reduce whose result every host can read."""
        local = torch.zeros(self.num_devices // self.world_size, *x.shape, dtype=torch.int32)
        local[0] = x
        total = self.to_device(local)[0].sum(0, dtype=torch.int32)
        self.xla.xs.mark_sharding(total, self.mesh, (None,) * total.dim())
        return total.cpu()

    # -- model and data placement
    def wrap_model(self, model: torch.nn.Module, shard: str = "none", precision: str = "fp32") -> torch.nn.Module:
        """The model itself (under SPMD its parameters stay replicated); shard 'fsdp' under SPMD:
        every parameter sharded over the mesh (_shard_parameters)."""
        if shard == "fsdp" and self.spmd:
            return self._shard_parameters(model)
        return super().wrap_model(model, shard, precision)

    def _shard_parameters(self, model: torch.nn.Module) -> torch.nn.Module:
        """Each parameter sharded over the 1-D device mesh along its first dimension that the
        device count divides (a scalar such as logit_scale, or a tensor no dimension of which
        divides, stays replicated). The compiler all-gathers weights where they are used and
        reduce-scatters their gradients; AdamW's states follow their parameters' sharding."""
        n = self.mesh.size()
        for p in model.parameters():
            dims = [d for d in range(p.dim()) if p.shape[d] % n == 0 and p.shape[d] >= n]
            if dims:
                spec = tuple("data" if d == dims[0] else None for d in range(p.dim()))
                self.xla.xs.mark_sharding(p, self.mesh, spec)
        return model

    def full_state(self, model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
        """Multi-host, where shards on other hosts are unreadable: each tensor in turn is copied
        replicated, by every host (a collective); the master keeps the copies."""
        if not self._multi_host:
            return super().full_state(model, optimizer)
        weights, optimizer_state = _host_state(model, optimizer, self._replicated_copy)
        if not self.is_master:
            return {}, {}
        return weights, optimizer_state

    def _replicated_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A replicated copy of an SPMD tensor (all-gathered when sharded). t * 1: a clone shares t's
        device data, whose sharding cannot change; t + 0 would turn -0.0 into 0.0."""
        copy = t.detach() * 1
        self.xla.xs.mark_sharding(copy, self.mesh, (None,) * copy.dim())
        return copy

    def device_batches(self, batches: Iterator, loader) -> DeviceBatches:
        """The next batch sent to the device by a background thread while the current step runs (as
        torch_xla's MpDeviceLoader does)."""
        return XlaBatches(self, batches, loader)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Under SPMD each host passes its local rows; dimension 0 is sharded over the mesh
        ('minibatch' sharding assembles the global batch across hosts)."""
        if not self.spmd:
            return super().to_device(*tensors)
        out = []
        for t in tensors:
            spec = self.xla.xs.ShardingSpec(
                self.mesh, ("data",) + (None,) * (t.dim() - 1), minibatch=self.world_size > 1
            )
            out.append(self.xla.xm.send_cpu_data_to_device([t], self.device, spec)[0])
        return out

    # -- step boundary and compilation
    def step_boundary(self):
        self.xla.torch_xla.sync()

    def add_step_closure(self, fn, args=()):
        """After the step's graph has run: no extra host sync inside the step."""
        self.xla.xm.add_step_closure(fn, args=args)

    def compile(self, fn):
        """fn itself: the XLA compiler already compiles each step's graph."""
        return fn

    def compile_count(self) -> int:
        data = self.xla.metrics.metric_data("CompileTime")
        if not data:
            return 0
        return int(data[0])

    def synchronize(self):
        self.xla.xm.wait_device_ops()

    # -- seeds and RNG state: the device RNG too
    def seed(self, seed: int):
        super().seed(seed)
        self.xla.xm.set_rng_state(seed, device=self.device)

    def rng_state(self) -> dict:
        state = super().rng_state()
        state["xla"] = int(self.xla.xm.get_rng_state(device=self.device))
        return state

    def set_rng_state(self, state: dict):
        super().set_rng_state(state)
        if "xla" in state:
            self.xla.xm.set_rng_state(state["xla"], device=self.device)


# ----------------------------------------------------------------------------- the feed


class DeviceBatches:
    """The loader's (images, tokens) batches on the device, for the training loop: next(feed) hands
    out the next batch; feed.prefetch(), called once the step has been queued, starts moving the one
    after it (a no-op here: the CPU's batches pass through); feed.state_dict() is the loader's state
    after the last batch handed out, never after one moved ahead, so a checkpoint resumes exactly."""

    def __init__(self, rt: Runtime, batches: Iterator, loader):
        self.rt = rt
        self.batches = batches  # over the loader
        self.loader = loader  # its state_dict()

    def __iter__(self):
        return self

    def __next__(self) -> list[torch.Tensor]:
        return self.rt.to_device(*next(self.batches))

    def prefetch(self):
        """Start moving the next batch to the device (while the step just queued runs)."""

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def close(self):
        """Stop moving batches (the end of the stage)."""


class AheadBatches(DeviceBatches):
    """One batch ahead: prefetch() takes the next host batch, notes the loader's state after it and
    starts its transfer (_start); next() finishes the transfer of the batch moved ahead (_finish),
    or moves one now when none is."""

    def __init__(self, rt: Runtime, batches: Iterator, loader):
        super().__init__(rt, batches, loader)
        self._ahead = None  # (the transfer under way, the loader state after its batch)
        self._state = None  # the loader state after the last batch handed out

    def __next__(self) -> list[torch.Tensor]:
        if self._ahead is None:
            self.prefetch()
        if self._ahead is None:
            raise StopIteration
        pending, self._state = self._ahead
        self._ahead = None
        return self._finish(pending)

    def prefetch(self):
        if self._ahead is not None:
            return
        batch = next(self.batches, None)
        if batch is not None:
            self._ahead = (self._start(batch), self.loader.state_dict())

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self._state is None else self._state

    def _start(self, batch):
        raise NotImplementedError

    def _finish(self, pending) -> list[torch.Tensor]:
        raise NotImplementedError


class CudaBatches(AheadBatches):
    """Copies from pinned memory on a side stream; the step's stream waits for the copy's event."""

    def __init__(self, rt: Runtime, batches: Iterator, loader):
        super().__init__(rt, batches, loader)
        self.stream = torch.cuda.Stream(rt.device)

    def _start(self, batch):
        with torch.cuda.stream(self.stream):
            tensors = [t.to(self.rt.device, non_blocking=True) for t in batch]
        return tensors, self.stream.record_event()

    def _finish(self, pending) -> list[torch.Tensor]:
        tensors, copied = pending
        compute = torch.cuda.current_stream(self.rt.device)
        compute.wait_event(copied)
        for t in tensors:
            t.record_stream(compute)  # allocated on the side stream: not reused while the step reads it
        return tensors


class XlaBatches(AheadBatches):
    """Sends each batch from a background thread (torch_xla's transfers are thread-safe)."""

    def __init__(self, rt: Runtime, batches: Iterator, loader):
        super().__init__(rt, batches, loader)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="to_device")

    def _start(self, batch):
        return self.pool.submit(self.rt.to_device, *batch)

    def _finish(self, pending) -> list[torch.Tensor]:
        return pending.result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


RUNTIMES = {"cpu": CpuRuntime, "cuda": CudaRuntime, "xla": XlaRuntime}


def init_runtime(device: str = "auto") -> Runtime:
    """Start the runtime for `device` (auto|cuda|xla|cpu): CUDA/CPU read torchrun's RANK,
    WORLD_SIZE and LOCAL_RANK; XLA uses every addressable device through SPMD when there are
    several (must run before any XLA tensor exists)."""
    return RUNTIMES[resolve_device(device)].start()


# ----------------------------------------------------------------------------- launcher

RENDEZVOUS = ("static", "c10d")


def slurm_nodes(environ=None) -> dict:
    """Node flags from SLURM's srun environment: nnodes = SLURM_NNODES, node_rank = SLURM_NODEID,
    master_addr = the first host of SLURM_JOB_NODELIST (a compressed list such as
    'gpu-[003-005,007],cpu01' -> 'gpu-003'). Raises ValueError outside a SLURM job."""
    environ = os.environ if environ is None else environ
    missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST") if not environ.get(k)]
    if missing:
        raise ValueError(f"--slurm: {', '.join(missing)} not set (run it under srun, one task per node)")
    # the name before any bracket, then the first number of the range in brackets, if any
    first = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", environ["SLURM_JOB_NODELIST"])
    host = first.group(1)
    if first.group(2):
        host += first.group(2)
    return dict(nnodes=int(environ["SLURM_NNODES"]), node_rank=int(environ["SLURM_NODEID"]), master_addr=host)


def launch_command(
    script: str,
    args: list[str],
    *,
    device: str = "auto",
    nproc: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    rdzv_backend: str | None = None,
    max_restarts: int = 0,
) -> tuple[list[str], dict]:
    """The command (and extra environment) that starts SCRIPT on this machine.

    CUDA: torchrun with one process per GPU (or --nproc). CPU: torchrun with --nproc processes
    (default 1). XLA/TPU: one process per host with PJRT_DEVICE=TPU; the script uses SPMD over all
    local chips. On a TPU pod run the same launch command on every host
    (gcloud compute tpus tpu-vm ssh NAME --worker=all --command "...").

    Several nodes (CUDA/CPU): the same command on each with --nnodes N and its --node-rank, all
    naming node 0 as --master-addr. rdzv_backend 'static' (torchrun's default; the default here
    without max_restarts): ranks follow the node ranks; 'c10d': torchrun's c10d rendezvous at
    master_addr:master_port (node ranks are assigned as nodes join; a restarted node rejoins).

    max_restarts: torchrun's --max-restarts: a rank that fails (killed outright, say) stops the
    others and starts them all again, up to N times; with train.py's --resume auto the new group
    continues from the newest checkpoint. It needs the c10d rendezvous, each round with a store
    of its own: torch 2.9 hands a restarted group the store of the first, whose ranks' addresses
    are stale (under 'static' always; under 'c10d' unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
    and the new group's process group hangs or fails to connect."""
    kind = resolve_device(device)
    env = {}
    if max_restarts < 0:
        raise ValueError(f"--max-restarts {max_restarts}: give a count, 0 or more")
    if kind == "xla":
        if nproc not in (None, 1):
            raise ValueError("XLA uses one process per host (SPMD over its devices); drop --nproc")
        if max_restarts:
            raise ValueError(
                "--max-restarts restarts torchrun's ranks, and XLA runs one process per host without "
                "torchrun: re-run the command (with --resume auto) instead"
            )
        pjrt_device = os.environ.get("PJRT_DEVICE")
        if not pjrt_device:
            pjrt_device = "TPU" if tpu_attached() else "CPU"
        env["PJRT_DEVICE"] = pjrt_device
        return [sys.executable, script, "--device", "xla", *args], env
    if nproc is None:
        nproc = torch.cuda.device_count() if kind == "cuda" else 1
    if rdzv_backend is None:
        rdzv_backend = "c10d" if max_restarts else "static"
    if rdzv_backend not in RENDEZVOUS:
        raise ValueError(f"unknown rendezvous {rdzv_backend!r}; choose {', '.join(RENDEZVOUS)}")
    if max_restarts and rdzv_backend == "static":
        raise ValueError(
            "--max-restarts needs the c10d rendezvous: torchrun's static one hands the restarted "
            "ranks the addresses of the ones they replace (drop --rdzv-backend static)"
        )
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} is not in 0..{nnodes - 1} (--nnodes {nnodes})")
    if rdzv_backend == "static":
        nodes = [f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
    else:
        nodes = ["--rdzv_backend=c10d", f"--rdzv_endpoint={master_addr}:{master_port}", "--rdzv_id=clipa"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if max_restarts:
        torchrun.append(f"--max-restarts={max_restarts}")
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # a fresh store each round (see above)
    cmd = [*torchrun, *nodes, script, "--device", kind, *args]
    if kind == "cpu":
        # each process gets its share of the cores instead of all of them fighting
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return cmd, env


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def run_launched(cmd: list[str], env: dict) -> int:
    """Run the launched command (torchrun, or the script itself under XLA) and wait for it; returns its
    exit status (128 + N when signal N ended it, as a shell says).

    The command runs in a process group of its own, so a stop signal (SIGTERM, SIGINT) to the
    launcher or to its group (a scheduler, `timeout`, Ctrl-C) reaches it once, passed on from here: a
    second SIGTERM would cut torchrun's shutdown short and with it the ranks' saves. torchrun sends it
    to its ranks, which save the step they are at and exit, and waits for them (30 s, then SIGKILL).
    Later stop signals are not passed on. Should the launcher die (SIGKILL), the command gets SIGTERM
    (Linux's parent-death signal)."""
    proc = None
    received = []
    passed = False

    def pass_on():
        nonlocal passed
        if passed or proc is None or not received:
            return
        passed = True
        name = signal.Signals(received[0]).name
        print(f"launch: {name} passed to pid {proc.pid}; waiting for it to exit", file=sys.stderr, flush=True)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(received[0])

    def on_signal(signum, _frame):
        received.append(signum)
        pass_on()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=_stop_with_parent(os.getpid()))
        pass_on()  # a signal that came while the command started
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def _stop_with_parent(parent: int):
    """A preexec_fn: the launched process gets SIGTERM when the launcher dies (Linux; None elsewhere)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None

    def child():
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the launcher died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return child


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="xla_utils.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("launch", help="start SCRIPT with the right processes for this machine")
    lp.add_argument("--device", default="auto", choices=DEVICES)
    lp.add_argument("--nproc", type=int, default=None, help="processes (default: GPU count, 1 on CPU)")
    lp.add_argument("--nnodes", type=int, default=1)
    lp.add_argument("--node-rank", type=int, default=0)
    lp.add_argument("--master-addr", default="127.0.0.1")
    lp.add_argument("--master-port", type=int, default=29500)
    lp.add_argument(
        "--rdzv-backend",
        default=None,
        choices=RENDEZVOUS,
        help="static (the default without --max-restarts): ranks by --node-rank; c10d (the default "
        "with it): torchrun's c10d rendezvous at the master",
    )
    lp.add_argument(
        "--slurm",
        action="store_true",
        help="take --nnodes, --node-rank and --master-addr from srun's SLURM_* variables",
    )
    lp.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="torchrun's: restart all ranks up to N times when one fails (use with train.py --resume auto)",
    )
    lp.add_argument("--print-only", action="store_true", help="print the command instead of running it")
    lp.add_argument("script")
    lp.add_argument("args", nargs=argparse.REMAINDER)
    ip = sub.add_parser("info", help="print which device auto would pick")
    ip.add_argument("--device", default="auto", choices=DEVICES)
    a = p.parse_args(argv)
    try:
        if a.cmd == "info":
            print(
                f"device: {resolve_device(a.device)} (cuda GPUs: {torch.cuda.device_count()}, "
                f"TPU attached: {tpu_attached()})"
            )
            return 0
        if not os.path.exists(a.script):
            raise FileNotFoundError(f"script not found: {a.script}")
        if a.slurm:
            nodes = slurm_nodes()
        else:
            nodes = dict(nnodes=a.nnodes, node_rank=a.node_rank, master_addr=a.master_addr)
        cmd, env = launch_command(
            a.script,
            a.args,
            device=a.device,
            nproc=a.nproc,
            **nodes,
            master_port=a.master_port,
            rdzv_backend=a.rdzv_backend,
            max_restarts=a.max_restarts,
        )
    except (ValueError, FileNotFoundError) as e:
        return cli.usage_error(e)
    if a.print_only:  # shell-quoted: braces and spaces survive a paste
        assignments = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
        print(" ".join(assignments + [shlex.quote(c) for c in cmd]))
        return 0
    return run_launched(cmd, {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
