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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def report(stages, *, gpu_mem: float = 80.0, devices: int = 8, bf16: bool = True) -> str:
    """The planner's table for (index, Stage) pairs (train.py's resolved stages)."""
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
    return "\n".join(rows)


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
