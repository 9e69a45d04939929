"""transforms.py: the training crop (reduced-DCT decode) against torchvision's full decode, the fast
resampler against Pillow's, simplejpeg against Pillow, the evaluation transform against torchvision,
other image modes, colour jitter, and normalize / Normalized."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import transforms

# CLIP's normalisation constants (any mean/std would do: the tests compare against torchvision)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def photo():
    """A 400x300 JPEG with fine structure, like a LAION image."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:300, 0:400]
    a = np.stack([(xx * 0.6) % 255, (yy * 0.8) % 255, ((xx + yy) * 0.3) % 255], -1)
    img = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = rng.randint(0, 380), rng.randint(0, 280)
        d.rectangle(
            [x, y, x + rng.randint(8, 60), y + rng.randint(8, 60)], tuple(int(v) for v in rng.randint(0, 255, 3))
        )
    b = io.BytesIO()
    img.save(b, "JPEG", quality=95)
    return b.getvalue()


def test_train_crop_geometry_matches_full_decode(photo):
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    full = Image.open(io.BytesIO(photo)).convert("RGB")
    fast, slow = transforms.TrainTransform(96), transforms.TrainTransform(96, draft=False)
    for seed in range(6):
        x = fast(photo, random.Random(seed))
        assert x.dtype == torch.uint8 and x.shape == (3, 96, 96)
        i, j, h, w = transforms.random_resized_crop_params(400, 300, (0.4, 1.0), (3 / 4, 4 / 3), random.Random(seed))
        ref = F.pil_to_tensor(F.resized_crop(full, i, j, h, w, [96, 96], InterpolationMode.BICUBIC))
        # without draft: torchvision's pixels up to rounding; the outer 2 px may differ since we
        # resample the box inside the image (the filter sees real neighbours, not a crop edge)
        d = (slow(photo, random.Random(seed)).float() - ref.float()).abs()
        assert d[:, 2:-2, 2:-2].max() <= 1 and d.mean() < 0.5
        err = (x.float() - ref.float()).abs().mean().item()
        shifted = F.pil_to_tensor(F.resized_crop(full, i + 4, j + 4, h, w, [96, 96], InterpolationMode.BICUBIC))
        off = (shifted.float() - ref.float()).abs().mean().item()
        assert 0 < err < 2 and err < off / 4, (seed, err, off)  # draft ran, geometry kept


def test_fast_resampler_keeps_the_fractional_box(photo):
    # torch's uint8 kernel starts its grid at the crop's first pixel edge; a box with one
    # fractional edge is cropped from (or, flipped, to) its integer edge: same pixels as
    # Pillow resampling the fractional box, up to rounding and the crop-edge border
    arr = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB").reduce(2)).copy()  # 200x150
    pil = Image.fromarray(arr)
    for box in [(20, 10, 150.5, 130), (20.5, 10, 150, 130), (20, 10.5, 150, 129.5), (19.5, 9.5, 151, 130)]:
        x = transforms._resize_box(arr, box, 96)
        ref = torch.from_numpy(np.array(pil.resize((96, 96), Image.BICUBIC, box=box))).permute(2, 0, 1)
        d = (x.float() - ref.float()).abs()
        assert x.dtype == torch.uint8 and x.shape == (3, 96, 96)
        assert d[:, 2:-2, 2:-2].max() <= 1 and d.mean() < 0.5, (box, d.max(), d.mean())
    assert torch.equal(
        transforms._resize_box(pil, (20.5, 10, 150, 130), 96), transforms._resize_box(arr, (20.5, 10, 150, 130), 96)
    )  # PIL image input
    both = (20.5, 10.5, 150.5, 130)  # no integer edge on x: Pillow resamples the fractional box
    ref = torch.from_numpy(np.array(pil.resize((96, 96), Image.BICUBIC, box=both))).permute(2, 0, 1)
    assert torch.equal(transforms._resize_box(arr, both, 96), ref)


def test_simplejpeg_and_pillow_decoders_agree(photo):
    for size, draft in [(96, True), (48, True), (224, True), (96, False)]:
        turbo = transforms.TrainTransform(size, draft=draft)
        pillow = transforms.TrainTransform(size, draft=draft, use_simplejpeg=False)
        for seed in range(4):
            assert torch.equal(turbo(photo, random.Random(seed)), pillow(photo, random.Random(seed)))
    # a truncated JPEG is still an error (a bad sample), as with Pillow alone
    with pytest.raises(OSError, match="image file is truncated"):
        transforms.train_transform(96)(photo[: len(photo) // 2])


def test_eval_transform_matches_torchvision(photo):
    """The one eval preprocessing decodes at full resolution: torchvision's pixels up to rounding,
    also where a reduced-scale decode would have been allowed (64 px from 400x300)."""
    import torchvision.transforms as T

    full = Image.open(io.BytesIO(photo)).convert("RGB")
    for size, interp, square in [
        (64, "bicubic", False),
        (96, "bilinear", True),
        (224, "bicubic", False),
        (48, "bilinear", True),
    ]:
        mode = T.InterpolationMode.BICUBIC if interp == "bicubic" else T.InterpolationMode.BILINEAR
        ref = T.PILToTensor()(
            (T.Resize((size, size), mode) if square else T.Compose([T.Resize(size, mode), T.CenterCrop(size)]))(full)
        )
        x = transforms.eval_transform(size, interp, square)(photo)
        assert x.dtype == torch.uint8 and x.shape == (3, size, size)
        assert (x.float() - ref.float()).abs().max() <= 1, (size, interp)
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        transforms.eval_transform(64, "cubic")


def test_other_image_modes_give_rgb_uint8():
    gray, rgba, cmyk = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("L", (120, 90), 77).save(gray, "JPEG")
    Image.new("RGBA", (50, 80), (10, 20, 30, 128)).save(rgba, "PNG")
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(cmyk, "JPEG")
    for b in (gray, rgba, cmyk):
        for t in (
            transforms.train_transform(32),
            transforms.eval_transform(32),
            transforms.eval_transform(32, "bilinear", True),
        ):
            x = t(b.getvalue())
            assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert transforms.eval_transform(32)(gray.getvalue()).float().mean().round() == 77


def _sixteen_bit(levels: np.ndarray, fmt: str) -> bytes:
    b = io.BytesIO()
    Image.fromarray(levels.astype(np.uint16)).save(b, fmt)
    return b.getvalue()


def test_16_bit_grayscale_keeps_its_levels():
    """16-bit grayscale (PNG and TIFF: Pillow's I;16, 16-bit PGM: I, a PIL image in mode I) keeps the
    high byte of each level, as Pillow reads 16-bit RGB; Pillow's convert('RGB') clips every level
    over 255, which made such an image pure white."""
    flat = np.full((72, 96), 100 * 256 + 37)
    for src in (
        _sixteen_bit(flat, "PNG"),
        _sixteen_bit(flat, "TIFF"),
        _sixteen_bit(flat, "PPM"),
        Image.fromarray(flat.astype(np.int32)),
    ):
        for t in (
            transforms.train_transform(32),
            transforms.TrainTransform(32, use_simplejpeg=False),
            transforms.eval_transform(32),
            transforms.eval_transform(32, "bilinear", True),
        ):
            x = t(src, random.Random(0))
            assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
            assert x.unique().tolist() == [100]
    # a gradient decodes as its 8-bit image does
    ramp = np.arange(72 * 96).reshape(72, 96) * 9
    eight = Image.fromarray((ramp >> 8).astype(np.uint8), "L")
    for t in (transforms.eval_transform(32, "bilinear", True), transforms.train_transform(32)):
        got, want = t(_sixteen_bit(ramp, "PNG"), random.Random(1)), t(eight, random.Random(1))
        assert (got.int() - want.int()).abs().max() <= 1


def test_color_jitter_matches_torchvision_ops(photo):
    import torchvision.transforms.functional as F

    img = Image.open(io.BytesIO(photo)).convert("RGB").resize((64, 48))
    rng = random.Random(5)
    out = transforms.color_jitter(img, rng, brightness=0.3, contrast=0, saturation=0, hue=0)
    f = random.Random(5)
    f.shuffle([0, 1, 2, 3])
    assert np.array_equal(np.asarray(out), np.asarray(F.adjust_brightness(img, f.uniform(0.7, 1.3))))
    out = transforms.color_jitter(img, random.Random(6), brightness=0, contrast=0, saturation=0, hue=0.08)
    f = random.Random(6)
    f.shuffle([0, 1, 2, 3])
    ref = F.adjust_hue(img, int(f.uniform(-0.08, 0.08) * 255) / 255)
    assert np.abs(np.asarray(out, np.int16) - np.asarray(ref, np.int16)).max() <= 1
    t = transforms.train_transform(32, color_jitter=True)
    xs = [t(photo, random.Random(s)) for s in range(20)]
    plain = [transforms.train_transform(32)(photo, random.Random(s)) for s in range(20)]
    assert torch.equal(xs[0], t(photo, random.Random(0)))
    gray = sum(bool((x[0] == x[1]).all() and (x[1] == x[2]).all()) for x in xs)
    assert 1 <= gray <= 10 and sum(not torch.equal(a, b) for a, b in zip(xs, plain)) >= 15


def test_normalize_matches_torchvision_and_wrapper(photo):
    import torchvision.transforms as T

    img = Image.open(io.BytesIO(photo)).convert("RGB").resize((32, 24))
    u8 = T.PILToTensor()(img)
    ref = T.Normalize(MEAN, STD)(T.ToTensor()(img))
    assert torch.allclose(transforms.normalize(u8, MEAN, STD), ref, atol=1e-5)
    batch = transforms.normalize(torch.stack([u8, u8]), MEAN, STD, dtype=torch.bfloat16)
    assert batch.dtype == torch.bfloat16 and batch.shape == (2, 3, 24, 32)
    with pytest.raises(ValueError, match="uint8"):
        transforms.normalize(u8.float(), MEAN, STD)
    wrapped = transforms.Normalized(transforms.eval_transform(32), MEAN, STD)
    expect = transforms.normalize(transforms.eval_transform(32)(photo), MEAN, STD)
    assert torch.equal(wrapped(photo), expect) and wrapped(photo).dtype == torch.float32


def test_png_bytes_are_decoded_by_their_content():
    """img2dataset may store a PNG under a .jpg name: it is a good image, decoded as a PNG."""
    png = io.BytesIO()
    Image.new("RGB", (30, 20), (3, 40, 200)).save(png, "PNG")
    x = transforms.train_transform(16)(png.getvalue())
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    assert x[2].float().mean().round() == 200


def test_errors_map_to_skip_reasons(photo, monkeypatch):
    """A decoder error is bad_image; an image over the pixel cap is refused by every transform as
    image_too_large."""
    with pytest.raises(OSError) as e:
        transforms.train_transform(16)(photo[: len(photo) // 2])
    assert transforms.skip_reason(e.value) == "bad_image"
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 400 * 300 - 1)
    for t in (
        transforms.train_transform(16),
        transforms.TrainTransform(16, use_simplejpeg=False),
        transforms.eval_transform(16),
    ):
        with pytest.raises(transforms.ImageTooLarge) as e:
            t(photo)
        assert transforms.skip_reason(e.value) == "image_too_large"
