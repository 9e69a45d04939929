"""Contrastive losses over the features of the global batch, each rank scoring its own rows.

softmax (CLIP, the papers' loss): this rank's rows against the features gathered from every rank,
labels offset by the rank; the mean of the image->text and text->image cross-entropies.

sigmoid (SigLIP, Zhai et al. 2023): every image-text pair is an independent binary decision,
-log sigmoid(z * (t * <x, y> + b)) with z = +1 for a true pair, -1 otherwise, summed over pairs and
divided by this rank's images. Two implementations with the same value and gradients:
- "gather": the texts of every rank gathered at once (memory O(global batch) per rank);
- "ring": the texts travel around the ring of ranks (send to the next, receive from the previous),
  each rank scoring its images against one arriving block at a time: memory O(local batch), and the
  exchange is point-to-point (torch.distributed send/recv) instead of an all-gather. Under XLA SPMD
  there are no ranks to pass blocks between: the compiler sees the global batch and inserts its own
  collectives, so the gather form is used there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xla_utils

LOSSES = ("softmax", "sigmoid")


def clip_loss(image_features, text_features, logit_scale, rt: xla_utils.Runtime, logit_bias=None):
    """Softmax contrastive loss with gather-with-grad (OpenCLIP's local_loss + gather_with_grad)."""
    all_image, offset = rt.all_gather_with_grad(image_features)
    all_text, _ = rt.all_gather_with_grad(text_features)
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _pair_signs(logits: torch.Tensor, positives_at: int | None) -> torch.Tensor:
    """z for a block of logits [images, texts]: +1 for the true pairs (the diagonal that starts at
    column `positives_at`), -1 for every other pair; all -1 when positives_at is None."""
    z = -torch.ones_like(logits)
    if positives_at is not None:
        rows = torch.arange(logits.shape[0], device=logits.device)
        z[rows, rows + positives_at] = 1.0
    return z


def _pair_loss(image_features, text_features, logit_scale, logit_bias, positives_at: int | None):
    """-sum log sigmoid(z * logits) of one block of images x texts; positives on the diagonal that
    starts at column `positives_at` (None: a block of negatives only)."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    z = _pair_signs(logits, positives_at)
    return -F.logsigmoid(z * logits).sum()


def sigmoid_loss_gather(image_features, text_features, logit_scale, rt: xla_utils.Runtime, logit_bias):
    all_text, offset = rt.all_gather_with_grad(text_features)
    return _pair_loss(image_features, all_text, logit_scale, logit_bias, offset) / image_features.shape[0]


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Send x to the next rank, receive the previous rank's block (point-to-point, no autograd)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), (rank + 1) % world), dist.P2POp(dist.irecv, out, (rank - 1) % world)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _block_grad(img, blk, scale, bias, positives_at, g):
    """d loss / d logits of one block, and the block's logits' inputs (for the chain rule)."""
    dots = img @ blk.T
    logits = scale * dots + bias
    z = _pair_signs(logits, positives_at)
    return -z * torch.sigmoid(-z * logits) * g, dots


class _RingSigmoid(torch.autograd.Function):
    """The sigmoid loss with texts passed around the ring, forward AND backward: nothing of other
    ranks is kept between the two (the backward passes the texts around again, each block carrying
    the gradient it collects back home), so memory stays O(local batch) whatever the world size."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, world):
        loss, blk = _pair_loss(img, txt, scale, bias, 0), txt
        for _ in range(world - 1):
            blk = _shift(blk)
            loss = loss + _pair_loss(img, blk, scale, bias, None)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.world = world
        return loss / img.shape[0]

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias = ctx.saved_tensors
        g = g / img.shape[0]
        d_img, d_scale, d_bias = torch.zeros_like(img), torch.zeros_like(scale), torch.zeros_like(bias)
        blk, d_blk = txt, torch.zeros_like(txt)
        for k in range(ctx.world):
            if k:
                blk, d_blk = _shift(blk), _shift(d_blk)
            d_logits, dots = _block_grad(img, blk, scale, bias, 0 if k == 0 else None, g)
            d_img += scale * d_logits @ blk
            d_blk = d_blk + scale * d_logits.T @ img
            d_scale += (d_logits * dots).sum()
            d_bias += d_logits.sum()
        d_txt = _shift(d_blk) if ctx.world > 1 else d_blk  # the last hop brings each block home
        return d_img, d_txt, d_scale, d_bias, None


def sigmoid_loss_ring(image_features, text_features, logit_scale, rt: xla_utils.Runtime, logit_bias):
    world = rt.world_size if rt.distributed else 1
    return _RingSigmoid.apply(image_features, text_features, logit_scale, logit_bias, world)


class Features(NamedTuple):
    """What the towers give the loss, for this rank's rows of the batch (fp32)."""

    image: torch.Tensor  # [b, E], L2-normalised
    text: torch.Tensor  # [b, E], L2-normalised
    scale: torch.Tensor  # the logit scale exp(t), a scalar
    bias: torch.Tensor | None  # SigLIP's logit bias (None for the softmax loss)


class ContrastiveLoss:
    """The loss a stage trains with, built once per stage: loss(features) -> the global batch's loss.
    ring: the sigmoid loss passes texts around the ring of ranks (memory O(local batch)) rather than
    gathering them; under XLA SPMD there are no ranks to pass blocks between, so it gathers."""

    def __init__(self, kind: str, rt: xla_utils.Runtime, ring: bool = True):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind = kind
        self.rt = rt
        self.ring = ring and not rt.spmd

    def __call__(self, f: Features) -> torch.Tensor:
        if self.kind == "softmax":
            return clip_loss(f.image, f.text, f.scale, self.rt)
        if self.ring:
            return sigmoid_loss_ring(f.image, f.text, f.scale, self.rt, f.bias)
        return sigmoid_loss_gather(f.image, f.text, f.scale, self.rt, f.bias)
