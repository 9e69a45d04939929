"""Memory planner: per stage, what one device holds, and the per-device batch, accumulation,
checkpointing and sharding that reach the stage's global batch on the given hardware.

    python train.py --cfg h14_v2 --plan [--gpu-mem 80 --devices 8]

The estimate counts bytes, from the model's configuration (nothing is allocated):
- state: fp32 weights 4 B, gradients 4 B and AdamW's two moments 8 B per parameter, divided by the
  device count under --shard fsdp (plus the largest block gathered in full while it computes);
- activations per sample, from what autograd keeps for the backward pass in model.Block: the block
  input and both LayerNorm in/outputs, q, k, v, the attention output and its re-laid-out copy
  (9 x tokens x width), the MLP's hidden pre- and post-GELU (2 x tokens x hidden); attention runs as
  scaled_dot_product_attention (flash / memory-efficient kernels: no tokens^2 term). With gradient
  checkpointing only each block's input is kept, plus one block recomputed during the backward. A
  tower that reads one row (CLS, EOT) keeps less in its last block, which computes that row alone;
- the contrastive loss: logits of this device's rows against the global batch (both directions,
  with their gradients); the input pixels (uint8 and normalised).
Elements are 4 B in fp32 and ~2 B under bf16 autocast (LayerNorm outputs stay fp32).
The estimate is checked against measured peak memory on the CPU (tests/test_plan.py).

Communication per optimizer step, for the plan chosen: what each rank sends (and, the collectives
being symmetric, receives) in the loss's feature exchange and in the gradient / parameter
collectives, and how long that takes at given link bandwidths beside the step's compute at a given
MFU. Bytes follow the ring algorithms (NCCL's for large messages), per rank, for a collective over n
ranks whose full tensor is S bytes (the all-gather's output, the reduce-scatter's input, the
all-reduce's tensor):
- all-gather: each rank sends (n-1)/n x S and receives as much (n-1 blocks of S/n pass on);
- reduce-scatter: the same (n-1 partial sums of S/n);
- all-reduce: 2 (n-1)/n x S (a reduce-scatter, then an all-gather);
- send / recv (the sigmoid ring's passes): the block itself.
CommCounter counts the same way, at the dispatcher, around the real collectives of a step
(tests/test_plan.py: the planner's counts equal the counted ones on 2 gloo processes).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model as model_lib
import transforms
import xla_utils

GB = 1024**3
ADAMW_BYTES = 4 + 4 + 8  # fp32 weight, gradient, exp_avg + exp_avg_sq
HEADROOM = 0.9  # plan for 90% of the device (allocator fragmentation, workspaces)
OVERHEAD_GB = 2.0  # CUDA context, kernels, communication buffers


@dataclass(frozen=True)
class Tower:
    tokens: int
    width: int
    hidden: int
    layers: int
    picked: bool = False  # the tower reads one row (CLS, EOT): its last block runs that row alone


def towers(cfg: model_lib.CLIPConfig, mask_ratio: float = 0.0) -> list[Tower]:
    """The image and text transformers at the stage's tokens (kept patches + CLS; text context)."""
    v = cfg.vision
    t = cfg.text
    kept = model_lib.keep_count(v.num_patches, mask_ratio)
    return [
        Tower(kept + 1, v.width, int(v.width * v.mlp_ratio), v.layers, v.pool == "cls"),
        Tower(t.context_length, t.width, int(t.width * t.mlp_ratio), t.layers, True),
    ]


def activation_bytes(
    cfg: model_lib.CLIPConfig,
    *,
    mask_ratio: float = 0.0,
    checkpointing: bool = False,
    bf16: bool = False,
    global_batch: int = 0,
) -> float:
    """Bytes one training sample costs at the peak of its step (forward activations kept for the
    backward, the backward's transient buffers and the loss's logits)."""
    e = 2 if bf16 else 4  # bytes of an autocast element
    total = 0.0
    recompute = 0.0
    for tw in towers(cfg, mask_ratio):
        ld = tw.tokens * tw.width
        lf = tw.tokens * tw.hidden
        block = 4 * ld * 4 + (5 * ld + 2 * lf) * e  # LayerNorm in/outputs fp32, the rest autocast
        if tw.picked:  # a picked last block: ln_1 in/out, k and v of every token; the rest of one row
            last = 2 * ld * 4 + 2 * ld * e + 2 * tw.width * 4 + (3 * tw.width + 2 * tw.hidden) * e
        else:
            last = block
        if checkpointing:
            total += tw.layers * ld * e
        else:
            total += (tw.layers - 1) * block + last
        total += ld * 4  # ln_pre / ln_final
        recompute = max(recompute, block)  # the towers' backward passes run one at a time
    if checkpointing:
        total += recompute
    v = cfg.vision
    total += 3 * v.image_size**2 * (1 + 4)  # uint8 batch + normalised fp32 pixels
    total += 4 * 4 * max(global_batch, 1)  # 2 directions x (logits + grad), fp32
    return total


def state_bytes(cfg: model_lib.CLIPConfig, *, shard: str, devices: int, bf16: bool = False) -> float:
    """Weights + gradients + AdamW moments held by one device (fsdp: 1/devices of them, plus the
    largest block gathered in full, twice when the next one is prefetched)."""
    params = model_lib.count_parameters(cfg, trainable=True)
    block = max(model_lib.block_parameters(tw.width, tw.hidden) for tw in towers(cfg))
    if shard == "none" or devices == 1:
        return params * ADAMW_BYTES
    return params * ADAMW_BYTES / devices + 2 * block * ((2 if bf16 else 4) + 4)


@dataclass
class Choice:
    shard: str
    checkpointing: bool
    per_device: int  # samples per device per optimizer step
    micro: int  # samples per device per forward (per_device // accum)
    accum: int
    state_gb: float
    act_gb: float
    total_gb: float
    cost: float  # relative compute: 1 + 1/3 (recompute) + 1/3 (feature-caching pass)


def choose(cfg, *, global_batch: int, mask_ratio: float, gpu_mem: float, devices: int, bf16: bool) -> Choice | None:
    """The cheapest setting that fits: fewest recomputations and accumulation passes, then no
    sharding (less communication), then the largest chunk. None when nothing fits."""
    if global_batch % devices:
        return None
    per = global_batch // devices
    budget = gpu_mem * HEADROOM - OVERHEAD_GB
    best = None
    for shard in xla_utils.SHARDING:
        state = state_bytes(cfg, shard=shard, devices=devices, bf16=bf16) / GB
        for ckpt in (False, True):
            act = (
                activation_bytes(cfg, mask_ratio=mask_ratio, checkpointing=ckpt, bf16=bf16, global_batch=global_batch)
                / GB
            )
            fit = int((budget - state) // act) if budget > state else 0
            accum = next((k for k in range(1, per + 1) if per % k == 0 and per // k <= fit), None)
            if accum is None:
                continue
            c = Choice(
                shard,
                ckpt,
                per,
                per // accum,
                accum,
                state,
                act * per // accum,
                state + act * per // accum + OVERHEAD_GB,
                1 + ckpt / 3 + (accum > 1) / 3,
            )
            key = (c.cost, shard != "none", c.accum)
            if best is None or key < (best.cost, best.shard != "none", best.accum):
                best = c
    return best


# ----------------------------------------------------------------------------- communication

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "send", "recv")
FEATURE_BYTES = 4  # the loss sees fp32 features (Step._features)
GRAD_BYTES = 4  # fp32 weights: fp32 gradients, DDP's buckets and FSDP's reduce dtype alike


def moved(kind: str, payload: float, n: int) -> float:
    """Bytes each of n ranks sends, and receives, for collectives whose full tensors total
    `payload` bytes (ring algorithms; see the module's docstring)."""
    if kind in ("all_gather", "reduce_scatter"):
        return payload * (n - 1) / n
    if kind == "all_reduce":
        return 2 * payload * (n - 1) / n
    if kind in ("send", "recv"):
        return payload
    raise ValueError(f"unknown collective {kind!r}; one of {', '.join(COLLECTIVES)}")


@dataclass(frozen=True)
class Collective:
    what: str  # e.g. "features all-gather"
    kind: str  # one of COLLECTIVES
    payload: int  # bytes of the full tensors (see moved), summed over the step's calls
    # "loss" and "step" (the loss's exchange; the step's non-finite flag): waited for;
    # "forward" or "backward": overlap that compute
    phase: str


def fsdp_gathered(cfg: model_lib.CLIPConfig, n: int) -> tuple[list[int], int, int]:
    """Elements FSDP2 gathers per unit over n ranks, as train.py shards the model (xla_utils.fsdp_units,
    then the root): ([each block's and tower's own], the root's own, the replicated scalars').
    fully_shard splits every parameter along dim 0 into n equal chunks, the last one padded: a
    parameter of d0 rows gathers n x ceil(d0 / n) rows. Counted on a meta model: nothing allocated."""
    with torch.device("meta"):
        m = model_lib.CLIP(cfg)
    seen = set()
    units = []
    for unit in xla_utils.fsdp_units(m):  # innermost first: a tower owns what its blocks do not
        own = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        units.append(own)
    rest = [p for p in m.parameters() if id(p) not in seen]

    def padded(ps):
        return sum(math.ceil(p.shape[0] / n) * n * (p.numel() // p.shape[0]) for p in ps if p.dim() > 0)

    return [padded(u) for u in units], padded(rest), sum(p.numel() for p in rest if p.dim() == 0)


def step_collectives(
    cfg: model_lib.CLIPConfig,
    *,
    shard: str,
    world: int,
    per_rank: int,
    accum: int = 1,
    bf16: bool = False,
    ring: bool = True,
) -> list[Collective]:
    """The collectives of one optimizer step of train.Step on `world` ranks (none on one), each
    rank holding `per_rank` samples in `accum` chunks. The loss runs once per chunk's backward pass
    on all of the rank's features (feature caching), so its exchange happens `accum` times. bf16:
    FSDP2 gathers bf16 parameters (CUDA's mixed precision) and reduces fp32 gradients; DDP's
    gradients are the fp32 weights' own."""
    if world == 1:
        return []
    feat = per_rank * cfg.embed_dim * FEATURE_BYTES  # one rank's image or text features
    out = []
    if cfg.loss == "softmax":  # image and text features gathered; the backward reduce-scatters their gradients
        out.append(Collective("features all-gather", "all_gather", accum * 2 * world * feat, "loss"))
        out.append(Collective("feature grads reduce-scatter", "reduce_scatter", accum * 2 * world * feat, "loss"))
    elif ring:  # texts pass world-1 times forward; backward: texts and their gradients again, one hop home
        passes = accum * (3 * world - 2)
        out.append(Collective("text ring send", "send", passes * feat, "loss"))
        out.append(Collective("text ring recv", "recv", passes * feat, "loss"))
    else:
        out.append(Collective("text all-gather", "all_gather", accum * world * feat, "loss"))
        out.append(Collective("text grads reduce-scatter", "reduce_scatter", accum * world * feat, "loss"))
    # any rank's non-finite loss drops the update on every rank: one flag, all-reduced on the device
    out.append(Collective("non-finite flag all-reduce", "all_reduce", xla_utils.Runtime.count_dtype.itemsize, "step"))
    if shard == "none":  # DDP: every gradient once, in the last chunk's backward (no_sync before)
        grads = model_lib.count_parameters(cfg, trainable=True) * GRAD_BYTES
        out.append(Collective("gradient all-reduce", "all_reduce", grads, "backward"))
        return out
    units, root, scalars = fsdp_gathered(cfg, world)
    e = 2 if bf16 else 4
    forwards = 2 * accum if accum > 1 else 1  # the no-grad caching pass, then each chunk with grad
    # every unit but the root is resharded after its forward and gathered again for its backward
    out.append(
        Collective("parameter all-gather (forward)", "all_gather", forwards * (sum(units) + root) * e, "forward")
    )
    out.append(Collective("parameter all-gather (backward)", "all_gather", accum * sum(units) * e, "backward"))
    grads = accum * (sum(units) + root) * GRAD_BYTES
    out.append(Collective("gradient reduce-scatter", "reduce_scatter", grads, "backward"))
    if scalars:  # logit scale (and bias): replicated, averaged once (only the last chunk's loss reaches them)
        out.append(Collective("scalar grads all-reduce", "all_reduce", scalars * GRAD_BYTES, "backward"))
    return out


@dataclass(frozen=True)
class Links:
    """Bandwidth per GPU and direction, in bytes/s: within a node (NVLink) and between nodes (the
    GPU's own network adapter). The figures of today's GPUs are train.py's defaults (config.py)."""

    nvlink: float
    network: float
    gpus_per_node: int

    def seconds(self, c: Collective, world: int) -> float:
        """Bandwidth time of c (latency left out). Within a node every rank moves its bytes over
        NVLink. Across nodes a ring leaves each node once per channel; NCCL runs one channel per
        adapter, so a node's adapters carry 1/gpus_per_node of a rank's bytes each; a ring pass of
        the sigmoid loss is one transfer, through one adapter."""
        b = moved(c.kind, c.payload, world)
        t = b / self.nvlink
        if world <= self.gpus_per_node:
            return t
        share = 1 if c.kind in ("send", "recv") else self.gpus_per_node
        return max(t, b / (share * self.network))


@dataclass(frozen=True)
class CommPlan:
    sent: dict  # phase -> bytes each rank sends (= receives)
    seconds: dict  # phase -> link time
    compute: float  # the step's compute at the given MFU, seconds
    exposed: float  # communication the step waits for, seconds
    bound: str  # "compute" or "comm"

    @property
    def step(self) -> float:
        return self.compute + self.exposed


def comm_plan(
    collectives: list[Collective],
    *,
    world: int,
    flops: float,
    mfu: float,
    peak: float,
    links: Links,
    shard: str = "none",
    accum: int = 1,
) -> CommPlan:
    """Time of one step: compute = flops / (mfu x peak), a third forward and two thirds backward.
    The loss's exchange waits: its result is needed at once. Parameter collectives overlap the
    compute of their phase (DDP: the last chunk's backward, bucket by bucket; FSDP2: the next
    unit's gather and the previous unit's reduce-scatter run beside the current unit's compute);
    whatever exceeds that window is waited for, and then the step is communication-bound."""
    sent = collections.defaultdict(float)
    secs = collections.defaultdict(float)
    for c in collectives:
        if c.kind == "recv":  # the other direction of the same transfers
            continue
        sent[c.phase] += moved(c.kind, c.payload, world)
        secs[c.phase] += links.seconds(c, world)
    compute = flops / (mfu * peak)
    windows = {"forward": compute / 3, "backward": 2 * compute / 3 / (accum if shard == "none" else 1)}
    over = sum(max(0.0, secs[p] - w) for p, w in windows.items())
    return CommPlan(
        dict(sent), dict(secs), compute, secs["loss"] + secs["step"] + over, "comm" if over > 0 else "compute"
    )


class CommCounter(TorchDispatchMode):
    """Counts the collectives run while it is active, at the dispatcher: torch.distributed's
    (DDP's buckets, FSDP2's gathers and reduce-scatters, send / recv) and the functional ones
    (the loss's gather with autograd). payload[kind]: bytes of the full tensors as `moved` takes
    them; other: any other collective seen (name -> calls). with CommCounter() as c: step(...)."""

    # op -> (kind, which argument holds the full tensor(s)); functional all-gathers: input x group size
    OPS = {
        "c10d._allgather_base_": ("all_gather", 0),
        "c10d.allgather_": ("all_gather", 0),
        "c10d.allgather_into_tensor_coalesced_": ("all_gather", 0),
        "c10d._reduce_scatter_base_": ("reduce_scatter", 1),
        "c10d.reduce_scatter_": ("reduce_scatter", 1),
        "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
        "c10d.allreduce_": ("all_reduce", 0),
        "c10d.allreduce_coalesced_": ("all_reduce", 0),
        "c10d.send": ("send", 0),
        "c10d.recv_": ("recv", 0),
        "_c10d_functional.all_gather_into_tensor": ("all_gather", 0),
        "_c10d_functional.all_gather_into_tensor_coalesced": ("all_gather", 0),
        "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", 0),
        "_c10d_functional.reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
        "_c10d_functional.all_reduce": ("all_reduce", 0),
        "_c10d_functional.all_reduce_coalesced": ("all_reduce", 0),
    }
    IGNORED = {"_c10d_functional.wait_tensor"}

    def __init__(self):
        super().__init__()
        self.payload = collections.Counter()
        self.other = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}.{func._opname}"
        if func.namespace in ("c10d", "_c10d_functional") and name not in self.IGNORED:
            if name in self.OPS:
                kind, i = self.OPS[name]
                size = _nbytes(args[i])
                if name.startswith("_c10d_functional.all_gather"):
                    size *= args[1]  # group size
                self.payload[kind] += size
            else:
                self.other[name] += 1
        return func(*args, **(kwargs or {}))

    def sent(self, n: int) -> float:
        """Bytes this rank sent (= received) in the counted collectives, by `moved`'s definition."""
        return sum(moved(k, b, n) for k, b in self.payload.items() if k != "recv")


def _nbytes(x) -> int:
    """Bytes of a tensor or a (nested) list of them."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_nbytes(t) for t in x)


def flops_per_step(cfg: model_lib.CLIPConfig, per_rank: int, mask_ratio: float) -> float:
    """Model FLOPs of one rank's step: forward + backward = 3 x forward, 2 FLOPs a multiply-add."""
    return 2 * 3 * model_lib.count_flops(cfg, mask_ratio=mask_ratio)["total_gflops"] * 1e9 * per_rank


def report(
    stages,
    *,
    gpu_mem: float = 80.0,
    devices: int = 8,
    bf16: bool = True,
    links: Links,
    mfu: float,
    peak_tflops: float,
) -> str:
    """The planner's tables for (index, Stage) pairs (train.py's resolved stages): memory, then
    communication and time per step under the memory plan."""
    rows = [
        f"memory plan: {devices} device(s) x {gpu_mem:g} GB, {'bf16 autocast' if bf16 else 'fp32'}; "
        f"AdamW fp32 states; {HEADROOM:.0%} of each device, {OVERHEAD_GB:g} GB runtime overhead",
        "| stage | model | params | tokens img/txt | state GB none/fsdp | act MB/sample plain/ckpt | "
        "global batch | plan: shard, ckpt, per-device batch = accum x chunk | est. GB/device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, s in stages:
        cfg = s.model_config()
        params = model_lib.count_parameters(cfg, trainable=True)
        tw = towers(cfg, s.mask_ratio)
        st = [state_bytes(cfg, shard=sh, devices=devices, bf16=bf16) / GB for sh in xla_utils.SHARDING]
        act = [
            activation_bytes(cfg, mask_ratio=s.mask_ratio, checkpointing=c, bf16=bf16, global_batch=s.batch_size)
            / 2**20
            for c in (False, True)
        ]
        c = choose(cfg, global_batch=s.batch_size, mask_ratio=s.mask_ratio, gpu_mem=gpu_mem, devices=devices, bf16=bf16)
        plan = (
            "does not fit (more devices or memory)"
            if c is None
            else f"--shard {c.shard}{' --grad-checkpointing' if c.checkpointing else ''} "
            f"--accum-steps {c.accum}: {c.per_device} = {c.accum} x {c.micro}"
        )
        rows.append(
            f"| {s.name} | {s.model} | {params / 1e6:.0f}M | {tw[0].tokens}/{tw[1].tokens} | "
            f"{st[0]:.1f}/{st[1]:.1f} | {act[0]:.1f}/{act[1]:.1f} | {s.batch_size} | {plan} | "
            f"{'-' if c is None else f'{c.total_gb:.1f}'} |"
        )
    rows += [
        "",
        f"communication per step under that plan: MB each GPU sends and receives (ring algorithms), "
        f"time at NVLink {links.nvlink / 1e9:g} GB/s, network {links.network / 1e9:g} GB/s per GPU, "
        f"{links.gpus_per_node} GPUs per node; compute at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s",
        "| stage | GPUs | shard, accum | per-GPU batch | loss exchange MB | params fwd/bwd MB | loss ms | "
        "params fwd/bwd ms | compute ms | step ms | comm share | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, s in stages:
        rows.append(
            comm_row(s, gpu_mem=gpu_mem, devices=devices, bf16=bf16, links=links, mfu=mfu, peak_tflops=peak_tflops)
        )
    return "\n".join(rows)


def comm_row(s, *, gpu_mem: float, devices: int, bf16: bool, links: Links, mfu: float, peak_tflops: float) -> str:
    """One stage's row of the communication table (its memory plan's sharding and accumulation)."""
    cfg = s.model_config()
    c = choose(cfg, global_batch=s.batch_size, mask_ratio=s.mask_ratio, gpu_mem=gpu_mem, devices=devices, bf16=bf16)
    if c is None:
        return f"| {s.name} | {devices} | does not fit |" + " - |" * 9
    cs = step_collectives(cfg, shard=c.shard, world=devices, per_rank=c.per_device, accum=c.accum, bf16=bf16)
    flops = flops_per_step(cfg, c.per_device, s.mask_ratio)
    p = comm_plan(
        cs,
        world=devices,
        flops=flops,
        mfu=mfu,
        peak=peak_tflops * 1e12,
        links=links,
        shard=c.shard,
        accum=c.accum,
    )
    mb = {k: v / 1e6 for k, v in p.sent.items()}
    ms = {k: v * 1e3 for k, v in p.seconds.items()}
    return (
        f"| {s.name} | {devices} | {c.shard}, {c.accum} | {c.per_device} | {mb.get('loss', 0):,.0f} | "
        f"{mb.get('forward', 0):,.0f}/{mb.get('backward', 0):,.0f} | {ms.get('loss', 0):.1f} | "
        f"{ms.get('forward', 0):.1f}/{ms.get('backward', 0):.1f} | {p.compute * 1e3:.1f} | {p.step * 1e3:.1f} | "
        f"{p.exposed / p.step:.0%} | {p.bound} |"
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measured_peak(cfg: model_lib.CLIPConfig, batch: int, *, checkpointing: bool) -> int:
    """How far one forward and backward of the contrastive loss at `batch` on the CPU raises the
    process's resident memory above what it held before the step (bytes): Linux's high-water mark
    (VmHWM), reset just before the step through /proc/self/clear_refs. Used to check
    activation_bytes (tests/test_plan.py); the step's gradients are part of it."""
    torch.manual_seed(0)
    m = model_lib.CLIP(cfg).train()
    m.set_grad_checkpointing(checkpointing)
    tokens = torch.randint(1, 1000, (batch, cfg.text.context_length))
    labels = torch.arange(batch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current resident size
    before = _status_kb("VmRSS")
    images = torch.randint(0, 256, (batch, 3, cfg.vision.image_size, cfg.vision.image_size), dtype=torch.uint8)
    img, txt, scale = m(transforms.normalize(images, cfg.image_mean, cfg.image_std), tokens)[:3]
    logits = scale * img @ txt.T
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return (_status_kb("VmHWM") - before) * 1024
