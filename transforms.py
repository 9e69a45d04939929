"""CLIPA image preprocessing: encoded image bytes -> uint8 CHW tensor, and normalisation.

Design:
- uint8 on the host, normalised on the device. The transforms return uint8 [3, H, W] tensors, so a
  loader's batches cross the host->device link in 4x fewer bytes than float32; the device calls
  `normalize` once per batch. `Normalized` wraps a transform for callers that want OpenCLIP's float
  output on the host.
- Reduced-DCT decode for training crops. A random resized crop is usually much smaller than the
  source image, so TrainTransform decodes a JPEG at 1/2, 1/4 or 1/8 DCT scale when the crop still
  has enough pixels at that scale, maps the crop box onto the reduced image and resamples it once
  (antialiased bicubic).
- Full-resolution decode for evaluation. EvalTransform always decodes every pixel: torchvision's
  Resize + CenterCrop (or square Resize) up to rounding.
- One pixel cap. An encoded image over MAX_IMAGE_PIXELS is refused from its header before any
  pixel is decoded (ImageTooLarge; the loaders count it as the skip "image_too_large").
- 16-bit grayscale becomes 8-bit by its high byte (eight_bit), not by Pillow's clipping conversion.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageEnhance

# the largest image (width x height) that is decoded: Pillow's decompression-bomb limit (0.25 GiB as
# RGB). One cap for the train and eval transforms, data.py's `stats` and its reshard pass.
MAX_IMAGE_PIXELS = 89_478_485

_INTERPOLATIONS = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
}


# ----------------------------------------------------------------------------- decoding


class ImageTooLarge(ValueError):
    """An encoded image over MAX_IMAGE_PIXELS: refused before decoding."""


def _check_pixels(width: int, height: int):
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{width}x{height} image is over MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")


def _open_image(src) -> Image.Image:
    """A PIL image (returned as is), or encoded bytes / a path / a file object opened lazily,
    its size checked against MAX_IMAGE_PIXELS (Pillow's own bomb error counts as too large too)."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    try:
        img = Image.open(src)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    _check_pixels(*img.size)
    return img


def skip_reason(error: Exception) -> str:
    """The skip count an image transform's exception goes to: image_too_large or bad_image."""
    if isinstance(error, ImageTooLarge):
        return "image_too_large"
    return "bad_image"


# Pillow's modes of 16-bit grayscale: PNG and TIFF (I;16...), 16-bit PGM and PIL images (I)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit L: the high byte of each level (clipped to 0..65535), as
    Pillow reads 16-bit RGB. Pillow's own conversion clips at 255: nearly every pixel white. Other
    images are returned as they are. The loaders, `stats` and the reshard pass all decode by it."""
    if img.mode not in _SIXTEEN_BIT_MODES:
        return img
    levels = np.clip(np.asarray(img), 0, 0xFFFF).astype(np.uint16)
    return Image.fromarray((levels >> 8).astype(np.uint8), "L")


def _rgb(img: Image.Image) -> Image.Image:
    img = eight_bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    hwc = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))  # [H, W, 3] -> [3, H, W]


def _jpeg_draft(img: Image.Image, size: tuple[int, int]) -> bool:
    """Ask Pillow's JPEG decoder for a reduced-DCT decode of about `size`; False when it will not
    (not a JPEG, or an image already loaded: a PIL image passed in)."""
    if getattr(img, "format", None) != "JPEG":
        return False
    return img.draft("RGB", size) is not None


# ----------------------------------------------------------------------------- crop geometry


def random_resized_crop_params(width: int, height: int, scale, ratio, rng: random.Random):
    """(top, left, h, w), torchvision RandomResizedCrop's algorithm with our own RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: central crop at the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(height * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def _dct_scale(W: int, H: int, box, out_wh: tuple[int, int]) -> int:
    """JPEG DCT scale divisor (1, 2, 4, 8) for resizing `box` of a WxH image to out_wh: the
    largest whose decoded image still has >= out_wh pixels across the box (Pillow draft's rule)."""
    box_w = max(box[2] - box[0], 1e-6)
    box_h = max(box[3] - box[1], 1e-6)
    need_w = max(1, math.ceil(W * out_wh[0] / box_w))
    need_h = max(1, math.ceil(H * out_wh[1] / box_h))
    r = min(W // need_w, H // need_h)
    return next((s for s in (8, 4, 2) if r >= s), 1)


def _axis_crop(a0: float, a1: float, n: int):
    """One axis of a resampling box [a0, a1) in an image n pixels long -> (c0, c1, flip): an
    integer crop whose first pixel edge (its last one when flip) is a box edge. The resampler's
    output grid starts at the crop's first edge, so the box is then resampled exactly. None
    when neither edge is integer (a box at an odd original pixel, seen at 1/2 scale)."""
    if a0 == int(a0):
        return int(a0), min(n, math.ceil(a1)), False
    if a1 == int(a1):
        return int(a0), int(a1), True
    return None


def _resize_box(img, box, size: int) -> torch.Tensor:
    """Resample `box` (x0, y0, x1, y1, fractional) of a decoded RGB image (HWC uint8 array or
    PIL image) to uint8 [3, size, size]: antialiased bicubic, PIL's filter (a=-0.5) and pixel
    grid. torch's uint8 AVX2 kernel (~2-3x faster than Pillow's resampler) when each axis has
    an integer box edge; Pillow's resize with the fractional box otherwise."""
    is_array = isinstance(img, np.ndarray)
    if is_array:
        h, w = img.shape[:2]
    else:
        w, h = img.size
    cx = _axis_crop(box[0], box[2], w)
    cy = _axis_crop(box[1], box[3], h)
    if cx is None or cy is None:
        pil = Image.fromarray(img) if is_array else img
        return _to_uint8_chw(pil.resize((size, size), Image.BICUBIC, box=box))
    x0, x1, flip_x = cx
    y0, y1, flip_y = cy
    if is_array:
        hwc = torch.from_numpy(img)[y0:y1, x0:x1]
    else:
        # bytearray: a writable buffer torch can share (Pillow's bytes are read-only)
        pixels = bytearray(img.crop((x0, y0, x1, y1)).tobytes())
        hwc = torch.frombuffer(pixels, dtype=torch.uint8).view(y1 - y0, x1 - x0, 3)  # [h, w, 3]
    x = hwc.permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w]: HWC memory read as channels-last, no copy
    flips = [dim for dim, flip in ((2, flip_y), (3, flip_x)) if flip]
    if flips:
        x = x.flip(flips)
    # explicit scales: the output grid is the box's, even where the crop runs past its far edge
    scale_h = size / (box[3] - box[1])
    scale_w = size / (box[2] - box[0])
    out = torch.ops.aten._upsample_bicubic2d_aa(x, [size, size], False, scale_h, scale_w)
    if flips:
        out = out.flip(flips)
    return out[0].contiguous()


# ----------------------------------------------------------------------------- augmentation


def color_jitter(
    img: Image.Image, rng: random.Random, brightness=0.32, contrast=0.32, saturation=0.32, hue=0.08
) -> Image.Image:
    """torchvision ColorJitter semantics on PIL (same enhancers, random order, HSV hue shift)."""
    ops = [0, 1, 2, 3]
    rng.shuffle(ops)
    for op in ops:
        if op == 0 and brightness:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == 1 and contrast:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == 2 and saturation:
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - saturation, 1 + saturation))
        elif op == 3 and hue:
            h, s, v = img.convert("HSV").split()
            shift = np.uint8(int(rng.uniform(-hue, hue) * 255) % 256)
            h = Image.fromarray((np.asarray(h, dtype=np.uint8) + shift).astype(np.uint8), "L")
            img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return img


# ----------------------------------------------------------------------------- transforms


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio 3/4..4/3), bicubic, no flip; optional colour jitter
    (0.32, 0.32, 0.32, 0.08) at p=0.8 and grayscale at p=0.2. PIL image / JPEG bytes -> uint8 CHW.
    `rng` (random.Random) makes a call reproducible; None uses the module RNG.
    JPEGs are decoded at 1/2..1/8 DCT scale when the crop allows (simplejpeg, or Pillow's draft
    mode: same pixels), the crop box mapped to the decoded pixel grid, then resampled with
    antialiased bicubic in torch's uint8 kernel. draft=False decodes in full (torchvision's
    pixels); use_simplejpeg=False takes Pillow's decoder for everything (its fallback otherwise).
    Raises ImageTooLarge for an image over MAX_IMAGE_PIXELS, another exception for a bad one."""

    def __init__(
        self,
        image_size: int,
        scale=(0.4, 1.0),
        ratio=(3 / 4, 4 / 3),
        color_jitter: bool = False,
        draft: bool = True,
        use_simplejpeg: bool = True,
    ):
        self.size = int(image_size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.color_jitter = color_jitter
        self.draft = draft
        self.use_simplejpeg = use_simplejpeg

    def _scale_for(self, W: int, H: int, box) -> int:
        """The DCT scale divisor this transform decodes a WxH image at for `box`."""
        if not self.draft:
            return 1
        return _dct_scale(W, H, box, (self.size, self.size))

    def _crop_turbo(self, src: bytes, rng) -> torch.Tensor | None:
        """simplejpeg path; None (before drawing from rng) when it cannot read the header."""
        try:
            H, W, _, _ = simplejpeg.decode_jpeg_header(src)
        except ValueError:
            return None
        _check_pixels(W, H)
        params = random_resized_crop_params(W, H, self.scale, self.ratio, rng)
        top, left, h, w = params
        box = (left, top, left + w, top + h)
        s = self._scale_for(W, H, box)
        # ceil(H / s) x ceil(W / s): the size of a 1/s DCT-scale decode
        decoded_hw = (-(-H // s), -(-W // s))
        try:
            arr = simplejpeg.decode_jpeg(src, "RGB", min_height=decoded_hw[0], min_width=decoded_hw[1])
        except ValueError:  # CMYK, corrupt or truncated data: Pillow decides
            return self._crop_pillow(src, rng, params)
        if arr.shape[:2] != decoded_hw:  # tiny image: libjpeg chose an M/8 scale
            return self._crop_pillow(src, rng, params)
        return _resize_box(arr, tuple(v / s for v in box), self.size)

    def _crop_pillow(self, src, rng, params=None) -> torch.Tensor:
        img = _open_image(src)
        W, H = img.size
        top, left, h, w = params or random_resized_crop_params(W, H, self.scale, self.ratio, rng)
        box = (left, top, left + w, top + h)
        s = self._scale_for(W, H, box)
        if s > 1 and not _jpeg_draft(img, (W // s, H // s)):
            s = 1
        return _resize_box(_rgb(img), tuple(v / s for v in box), self.size)

    def _jitter(self, x: torch.Tensor, rng) -> torch.Tensor:
        """Colour jitter at p=0.8, then grayscale at p=0.2."""
        out = Image.fromarray(x.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
        if rng.random() < 0.8:
            out = color_jitter(out, rng)
        if rng.random() < 0.2:
            out = out.convert("L").convert("RGB")
        return _to_uint8_chw(out)

    def __call__(self, src, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random
        x = None
        if self.use_simplejpeg and isinstance(src, (bytes, bytearray)) and src[:2] == b"\xff\xd8":
            x = self._crop_turbo(src, rng)
        if x is None:
            x = self._crop_pillow(src, rng)
        if self.color_jitter:
            x = self._jitter(x, rng)
        return x


class EvalTransform:
    """Short-side resize + center crop (v1, bicubic) or square resize (v2, bilinear) -> uint8 CHW,
    decoded at full resolution: torchvision's Resize(size)+CenterCrop(size) / Resize((size, size))
    up to rounding. The one evaluation preprocessing (zero-shot eval and the model's transforms)."""

    def __init__(self, image_size: int, interpolation: str = "bicubic", square_resize_only: bool = False):
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(_INTERPOLATIONS)}")
        self.size = int(image_size)
        self.resample = _INTERPOLATIONS[interpolation]
        self.square = square_resize_only

    def _box(self, W: int, H: int) -> tuple[float, float, float, float]:
        """The source pixels that become the output: the whole image (square resize), or the
        center crop of the short-side resize mapped back to source pixels (one resampling)."""
        s = self.size
        if self.square:
            return (0.0, 0.0, float(W), float(H))
        if W <= H:
            ow, oh = s, int(s * H / W)
        else:
            ow, oh = int(s * W / H), s
        top = int(round((oh - s) / 2.0))
        left = int(round((ow - s) / 2.0))
        return (left * W / ow, top * H / oh, (left + s) * W / ow, (top + s) * H / oh)

    def __call__(self, src, rng=None) -> torch.Tensor:
        img = _open_image(src)
        box = self._box(*img.size)
        return _to_uint8_chw(_rgb(img).resize((self.size, self.size), self.resample, box=box))


def train_transform(image_size: int, scale=(0.4, 1.0), color_jitter: bool = False) -> TrainTransform:
    """The training preprocessing (data.make_train_loader's): random resized crop, draft decode."""
    return TrainTransform(image_size, scale=scale, color_jitter=color_jitter)


def eval_transform(image_size: int, interpolation: str = "bicubic", square_resize_only: bool = False) -> EvalTransform:
    """The evaluation preprocessing, full-resolution decode (see EvalTransform)."""
    return EvalTransform(image_size, interpolation, square_resize_only)


# ----------------------------------------------------------------------------- normalisation


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] or [3,H,W] on any device -> (x/255 - mean)/std as `dtype`, on that device.
    The one device-side preprocessing step of training and evaluation (uint8 transfer)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    # one fused multiply-add: x * (1/(255 std)) - mean/std
    return (images.float() * (1.0 / (255.0 * std_t)) - mean_t / std_t).to(dtype)


class Normalized:
    """Wrap a uint8 transform into an OpenCLIP-style one returning a normalised float CHW tensor."""

    def __init__(self, transform: Callable, mean, std):
        self.transform = transform
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, src, *args, **kwargs) -> torch.Tensor:
        return normalize(self.transform(src, *args, **kwargs), self.mean, self.std)

    def __repr__(self):
        return f"Normalized({self.transform!r}, mean={self.mean}, std={self.std})"
