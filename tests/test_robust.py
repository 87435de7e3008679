"""--robust: the differentiable JPEG and resize against PIL's, their gradients, and the attack."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import uad
import unsegment.cli
import unsegment.images
import unsegment.probes
from helpers import EXAMPLES, small_photo


def pil_jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.asarray(im)


def photo(name: str, grey: bool = False) -> np.ndarray:
    with Image.open(EXAMPLES / name) as im:
        return np.asarray(im.convert("L" if grey else "RGB"))


@pytest.mark.parametrize("quality", [95, 85, 75, 50, 20])
@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png"])
def test_jpeg_matches_pil_within_a_grey_level_on_average(name, quality):
    pixels = photo(name)
    ours = uad.to_pixels(uad.jpeg(uad.to_tensor(pixels), quality)).astype(int)
    theirs = pil_jpeg(pixels, quality).astype(int)
    diff = np.abs(ours - theirs)
    change = np.abs(theirs - pixels).mean()  # what JPEG itself does, for scale
    # the DCTs differ in the last bit (libjpeg's is fixed point), which flips a rare coefficient
    # that lies near a rounding boundary: a few isolated pixels then differ by more
    assert diff.mean() < 0.7 and diff.mean() < change / 2
    assert np.percentile(diff, 99) <= (5 if quality >= 50 else 8) and diff.max() <= 40


def test_jpeg_of_grey_and_odd_sized_images_matches_pil():
    grey = photo("astronaut.png", grey=True)[:301, :203]  # odd sizes: partial blocks, edge pad
    ours = uad.to_pixels(uad.jpeg(uad.to_tensor(grey), 75)).astype(int)
    diff = np.abs(ours - pil_jpeg(grey, 75).astype(int))
    assert ours.shape == grey.shape and diff.mean() < 0.4 and np.percentile(diff, 99) <= 3
    rgb = photo("coffee.png")[:123, :77]
    ours = uad.to_pixels(uad.jpeg(uad.to_tensor(rgb), 85)).astype(int)
    diff = np.abs(ours - pil_jpeg(rgb, 85).astype(int))
    assert diff.mean() < 0.8 and np.percentile(diff, 99) <= 5


@pytest.mark.parametrize("scale", [0.5, 0.75, 0.9])
def test_resize_round_trip_matches_pil_bicubic(scale):
    pixels = photo("chelsea.png")
    im = Image.fromarray(pixels)
    w, h = im.size
    small = im.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    theirs = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(int)
    ours = uad.to_pixels(uad.resize_round_trip(uad.to_tensor(pixels), scale)).astype(int)
    diff = np.abs(ours - theirs)
    assert diff.mean() < 0.4 and diff.max() <= 2


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
def test_gaussian_blur_matches_pils_within_half_a_grey_level_on_average(sigma):
    pixels = photo("coffee.png")
    ours = uad.to_pixels(uad.gaussian_blur(uad.to_tensor(pixels), sigma)).astype(int)
    theirs = unsegment.probes.apply_probe(pixels, f"blur:{sigma}").astype(int)  # PIL's
    diff = np.abs(ours - theirs)
    # PIL approximates the Gaussian by three box blurs; ours is the Gaussian itself
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 2 and diff.max() <= 10
    assert diff.mean() < np.abs(theirs - pixels).mean() / 3  # far less than the blur itself


@pytest.mark.parametrize("bits", [1, 3, 5, 7, 8])
def test_reduce_bits_equals_the_numpy_probe_exactly(bits):
    pixels = photo("chelsea.png")
    ours = uad.to_pixels(uad.reduce_bits(uad.to_tensor(pixels), bits))
    theirs = unsegment.probes.apply_probe(pixels, f"bits:{bits}")
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(ours)) <= 2 ** bits and (bits < 8 or np.array_equal(ours, pixels))


def test_gaussian_noise_has_the_probes_std_and_is_seeded():
    pixels = uad.to_pixels(0.3 + 0.4 * uad.to_tensor(photo("chelsea.png")))  # no clipping
    x = uad.to_tensor(pixels)
    draw = lambda seed: uad.gaussian_noise(x, 4 / 255, torch.Generator().manual_seed(seed))
    ours = (uad.to_pixels(draw(0)).astype(float) - pixels).ravel()
    theirs = (
        unsegment.probes.apply_probe(pixels, "noise:4", 0, "a").astype(float) - pixels
    ).ravel()
    for d in (ours, theirs):  # std 4 grey levels, rounded: sqrt(16 + 1/12)
        assert abs(d.std() - np.sqrt(16 + 1 / 12)) < 0.05 and abs(d.mean()) < 0.05
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    again = unsegment.probes.apply_probe(pixels, "noise:4", 0, "a")
    assert np.array_equal(again, unsegment.probes.apply_probe(pixels, "noise:4", 0, "a"))
    assert not np.array_equal(again, unsegment.probes.apply_probe(pixels, "noise:4", 0, "b"))


def test_gradients_of_the_smooth_pipelines_pass_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 19, 21, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: uad.jpeg(t, 60, rounding=False), (x,))
    assert torch.autograd.gradcheck(lambda t: uad.resize_round_trip(t, 0.6, False), (x,))
    assert torch.autograd.gradcheck(lambda t: uad.gaussian_blur(t, 1.3, False), (x,))
    noisy = lambda t: uad.gaussian_noise(t, 0.02, torch.Generator().manual_seed(0), False)
    assert torch.autograd.gradcheck(noisy, (x,))
    assert torch.autograd.gradcheck(lambda t: uad.reduce_bits(t, 3, False), (x,))
    grey = torch.rand(1, 1, 17, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: uad.jpeg(t, 90, rounding=False), (grey,))


def test_rounding_passes_the_smooth_gradient_straight_through():
    gen = torch.Generator().manual_seed(1)
    # a photo squeezed into mid-grey: no value reaches a clamp at 0 or 255 either way
    x = 0.3 + 0.4 * uad.to_tensor(small_photo((40, 32))).double()
    weights = torch.randn(1, 3, 32, 40, dtype=torch.float64, generator=gen)
    for fn in (
        lambda t, r: uad.jpeg(t, 75, r),
        lambda t, r: uad.resize_round_trip(t, 0.5, r),
        lambda t, r: uad.gaussian_blur(t, 1.5, r),
        lambda t, r: uad.gaussian_noise(t, 0.01, torch.Generator().manual_seed(2), r),
        lambda t, r: uad.reduce_bits(t, 4, r),
    ):
        grads = []
        for rounding in (True, False):
            t = x.clone().requires_grad_(True)
            (fn(t, rounding) * weights).sum().backward()
            grads.append(t.grad)
        assert torch.allclose(grads[0], grads[1]) and grads[0].abs().sum() > 0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("jpeg", "is not jpeg:Q[-Q]"),
        ("jpeg:0-50", "jpeg takes values in 1..100"),
        ("resize:0-1", "resize takes values in 0..1"),
        ("resize:0.9-0.5", "'resize:0.9-0.5' is reversed; write resize:0.5-0.9"),
        ("sharpen:3", "'sharpen:3' is not"),
        ("blur:0-1", "blur takes values in 0..20"),
        ("bits:0-4", "bits takes values in 1..8"),
        ("noise:2-100", "noise takes values in 0..64"),
        ("jpeg:a-b", "has no number range"),
    ],
)
def test_bad_robust_specs_are_one_line(spec, message):
    with pytest.raises(uad.UADError, match=re.escape(message)):
        uad.UADConfig(robust=spec)


def test_publish_draws_each_images_transformation_from_the_seed():
    x = uad.to_tensor(small_photo()).repeat(3, 1, 1, 1)
    kinds = uad.parse_robust("jpeg:50-95,resize:0.5-1,blur:0.5-2,noise:2-8,bits:3-6,none")
    a = uad.publish(x, kinds, torch.Generator().manual_seed(3))
    b = uad.publish(x, kinds, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    draws = [uad.publish(x[:1], kinds, torch.Generator().manual_seed(s)) for s in range(12)]
    assert len({round(float((d - x[:1]).abs().sum()), 3) for d in draws}) > 3  # they vary


FAST = ["--preset", "no-fidelity", "--steps", "3", "--deform-steps", "2", "--quiet"]


def test_robust_attack_through_the_cli_is_within_eps_and_seeded(
    tiny_archs, tiny_checkpoints, tmp_path
):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    outputs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / f"{name}.png"
        code = unsegment.cli.main(
            [
                str(tmp_path / "in.png"),
                str(out),
                "--robust",
                "jpeg:50-95,resize:0.5-1,none",
                "--seed",
                str(seed),
                "--checkpoint",
                str(tiny_checkpoints["vit_b"]),
                *FAST,
            ]
        )
        assert code == 0
        outputs.append(out.read_bytes())
        diff = np.abs(unsegment.images.read_image(out).pixels.astype(int) - small_photo())
        assert 0 < diff.max() <= 8
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_robust_to_jpeg_keeps_more_distance_after_a_real_jpeg(tiny_sam):
    pixels = small_photo((192, 128))
    image = uad.to_tensor(pixels)
    f = lambda x: uad.encoder_features(tiny_sam, x, (3, 4, 5, 6))
    distance = {}
    for robust in ("", "jpeg:75"):
        config = uad.preset_config("no-fidelity", steps=20, deform_steps=5, robust=robust)
        adv = uad.to_pixels(
            uad.quantize(uad.attack(image, tiny_sam, config).adv, image, config.eps)
        )
        assert np.abs(adv.astype(int) - pixels).max() <= 8
        published = uad.to_tensor(pil_jpeg(adv, 75))
        with torch.no_grad():
            distance[robust] = uad.feature_distance(f(published), f(image)).item()
    # over seeds 0-5 the robust attack kept 20-29% more distance (seed 0, the default: 20%)
    assert distance["jpeg:75"] > 1.1 * distance[""]
