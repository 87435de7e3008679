"""The method in uad.py: the attack, its stages, presets, features, quantisation, protect."""

import numpy as np
import pytest
import torch
from PIL import Image

import uad
import unsegment.images
from helpers import EXAMPLES, build_tiny_sam, small_photo


def test_attack_moves_features_further_than_random_noise(tiny_sam):
    image = uad.to_tensor(small_photo())
    config = uad.UADConfig(steps=10, deform_steps=3, proxy_steps=1)
    adv, _, stats = uad.attack(image, tiny_sam, config)
    gen = torch.Generator().manual_seed(0)
    noise = torch.empty(image.shape).uniform_(-config.eps, config.eps, generator=gen)
    noisy = uad.project(image + noise, image, config.eps)
    with torch.no_grad():
        f = lambda x: uad.encoder_features(tiny_sam, x, config.layers)
        random_distance = uad.feature_distance(f(noisy), f(image)).item()
        attack_distance = uad.feature_distance(f(adv), f(image)).item()
    assert attack_distance == pytest.approx(stats.feature_distance[0], rel=1e-4)
    assert attack_distance > 2 * random_distance
    assert (adv - image).abs().max() <= config.eps + 1e-6


def test_reference_preset_runs_no_proxy_loop_and_paper_preset_does(tiny_sam):
    image = uad.to_tensor(small_photo())
    counts = {}
    for preset in ("reference", "paper"):
        config = uad.preset_config(preset, steps=3, deform_steps=2)
        counts[preset] = uad.attack(image, tiny_sam, config)[2]
    # reference: f(I), f(target), then one forward and one backward per PGD step
    assert (counts["reference"].forwards, counts["reference"].backwards) == (2 + 3, 3)
    # paper: per deformation step f(target) + the T_f = 4 proxy steps, each with a backward
    assert (counts["paper"].forwards, counts["paper"].backwards) == (2 + 2 * 5 + 3, 2 * 5 + 3)


def test_fidelity_gradient_reaches_the_flow_and_descends_l_f(tiny_sam):
    # 1024 px long side: SAM's resize (and its rounding) is skipped, so L_F is smooth in the flow
    image = uad.to_tensor(small_photo((1024, 640)))
    config = uad.UADConfig(proxy_steps=1)
    surrogate = uad.Ensemble([uad.Surrogate.of(tiny_sam)], config, uad.Stats())
    with torch.no_grad():
        f_image = surrogate(image)
    gen = torch.Generator().manual_seed(0)
    cells = uad.mosaic_cells(640, 1024, config, "cpu")
    ctrl = (20 * torch.randn(1, 4, 2, 6, 6, generator=gen)).requires_grad_(True)  # 1024-scale px
    proxy = uad.project(image + 0.03 * torch.randn(image.shape, generator=gen), image, config.eps)

    def flow_gradient(lambda_f):
        ctrl.grad = None
        flow = uad.mosaic_flow(ctrl, cells)
        ssim, target = uad.warp_kernel.warp_ssim(image, flow, image)
        loss = ssim + config.lambda_c * uad.flow_regulariser(flow, config)
        c = uad.UADConfig(proxy_steps=1, lambda_f=lambda_f)
        uad.backward_with_fidelity(loss, target, proxy, image, f_image, surrogate, c, gen, None)
        return ctrl.grad.clone()

    g = flow_gradient(1.0) - flow_gradient(0.0)  # the gradient of L_F alone

    def l_f(c):
        with torch.no_grad():
            target = uad.warp_kernel.flow_warp(image, uad.mosaic_flow(c, cells))
            f = lambda x: uad.encoder_features(tiny_sam, x, config.layers)
            return uad.feature_distance(f(proxy), f(target)).item()

    step = 2.0 / g.abs().max().item()  # moves no control point by more than 2 px
    predicted = -(g * g).sum().item() * step
    actual = l_f(ctrl.detach() - step * g) - l_f(ctrl.detach())
    assert predicted < 0 and actual < 0
    assert actual == pytest.approx(predicted, rel=0.3)


def test_flow_regulariser_sees_the_seams_of_the_applied_flow():
    config = uad.UADConfig(num_flows=2)
    cells = uad.mosaic_cells(64, 96, config, "cpu")  # several 28 px cells
    same = torch.full((1, 2, 2, 6, 6), 5.0)  # two uniform fields, equal: one uniform flow
    seams = same.clone()
    seams[:, 1] = -5.0  # each field still uniform (TV 0, variance 0), but they disagree
    flat = uad.flow_regulariser(uad.mosaic_flow(same, cells), config)
    jumps = uad.flow_regulariser(uad.mosaic_flow(seams, cells), config)
    assert flat.item() < 1e-4
    # per field, both mosaics cost nothing; the applied flow's seams cost TV and variance
    whole = torch.ones(1, 1, 1, 64, 96)  # one field owns every pixel
    per_field = [
        uad.flow_regulariser(uad.mosaic_flow(seams[:, k : k + 1], whole), config) for k in (0, 1)
    ]
    assert max(v.item() for v in per_field) < 1e-4
    assert jumps.item() > 1.0


def test_encoder_passes_are_counted_before_the_attack(tiny_sam):
    image = uad.to_tensor(small_photo())
    for preset, d, s, t in [("paper", 2, 3, 4), ("paper", 3, 1, 2), ("no-fidelity", 2, 3, 4)]:
        config = uad.preset_config(
            preset, deform_steps=d, steps=s, **({"proxy_steps": t} if preset == "paper" else {})
        )
        stats = uad.attack(image, tiny_sam, config).stats
        assert (stats.forwards, stats.backwards) == uad.encoder_passes(config), (preset, d, s)
    assert uad.encoder_passes(uad.preset_config("paper")) == (242, 240)
    assert uad.encoder_passes(uad.preset_config("no-fidelity")) == (42, 40)


def test_encoder_features_skip_later_blocks_and_neck(tiny_sam):
    ran = []
    for name in ("7", "neck"):
        module = tiny_sam.image_encoder.blocks[7] if name == "7" else tiny_sam.image_encoder.neck
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
    feats = uad.encoder_features(tiny_sam, uad.to_tensor(small_photo()), (3, 4, 5, 6))
    assert ran == [] and len(feats) == 4 and feats[0].shape == (1, 64, 64, 64)


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"])
def test_preprocessing_matches_sam_predictor(name):
    from segment_anything import SamPredictor

    sam = build_tiny_sam("vit_b")
    seen = {}
    sam.image_encoder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    pixels = unsegment.images.read_image(EXAMPLES / name).pixels
    SamPredictor(sam).set_image(pixels)
    ours = uad.sam_input(uad.to_tensor(pixels), sam)
    grey_levels = ((ours - seen["x"]) * sam.pixel_std).abs()
    # PIL resizes in fixed point: a few pixels land one grey level away from our float resize
    assert grey_levels.max() <= 1 + 1e-3
    assert grey_levels.mean() < 0.25


def test_preprocessing_of_a_grey_image_replicates_it():
    sam = build_tiny_sam("vit_b")
    grey = uad.to_tensor(small_photo()[..., 1])
    rgb = grey.expand(-1, 3, -1, -1)
    assert torch.equal(uad.sam_input(grey, sam), uad.sam_input(rgb, sam))


@pytest.mark.parametrize("seed", range(20))
def test_quantized_output_is_on_the_lattice_and_exactly_within_eps(seed):
    gen = torch.Generator().manual_seed(seed)
    eps = (
        float(torch.randint(1, 65, (), generator=gen))
        / 255
        * float(torch.rand((), generator=gen) + 0.5)
    )
    image = torch.randint(0, 256, (2, 3, 17, 23), generator=gen).float() / 255
    adv = uad.project(image + (torch.rand(image.shape, generator=gen) - 0.5) * 4 * eps, image, eps)
    assert (adv - image).abs().max() <= eps + 1e-7 and adv.min() >= 0 and adv.max() <= 1
    q = uad.quantize(adv, image, eps)
    levels = q * 255
    assert torch.equal(levels, levels.round())
    assert ((levels - image * 255).round().abs() <= int(eps * 255 + 1e-6)).all()
    assert (q - image).abs().max() <= eps + 1e-7


@pytest.mark.parametrize("seed", range(5))
def test_quantize_holds_eps_on_the_16bit_lattice_and_in_float(seed):
    gen = torch.Generator().manual_seed(seed)
    eps = float(torch.randint(1, 65, (), generator=gen)) / 255
    image = torch.randint(0, 65536, (1, 1, 17, 23), generator=gen).float() / 65535
    adv = (image + (torch.rand(image.shape, generator=gen) - 0.5) * 4 * eps).clamp(0, 1)
    q = uad.quantize(adv, image, eps, 65535)
    levels = (q * 65535).double()
    assert torch.equal(levels, levels.round())
    steps = (levels - image.double() * 65535).round().abs()
    assert (steps <= round(eps * 65535)).all()
    assert steps.max().item() / 65535 <= eps  # floor(eps * 65535) levels: exactly within eps
    floats = torch.rand(image.shape, generator=gen)
    q = uad.quantize(floats + 2 * eps, floats, eps, None)  # float: no lattice, within eps
    assert q.dtype == torch.float32 and (q.double() - floats.double()).abs().max() <= eps


def test_pixels_of_each_depth_go_to_tensors_and_back_exactly():
    rng = np.random.default_rng(0)
    for pixels, levels in [
        (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), 255),
        (rng.integers(0, 65536, (5, 7), dtype=np.uint16), 65535),
        (rng.random((5, 7), dtype=np.float32), None),
    ]:
        x = uad.to_tensor(pixels)
        assert x.shape[:2] == (1, pixels.ndim * 2 - 3) and 0 <= x.min() and x.max() <= 1
        back = uad.to_pixels(x, levels)
        assert back.dtype == pixels.dtype and np.array_equal(back, pixels)


def test_protect_keeps_a_16bit_or_float_pil_image_s_depth_within_eps(tiny_sam):
    config = uad.UADConfig(steps=2, deform_steps=1, proxy_steps=1)
    grey = small_photo()[..., 1]
    deep = Image.fromarray(grey.astype(np.uint16))  # dark: every value <= 255 of 65535
    out = uad.protect(deep, tiny_sam, config=config)
    assert out.mode == "I;16"
    diff = np.abs(np.asarray(out, np.int64) - grey)
    assert 0 < diff.max() <= 8 * 257  # floor(8 / 255 * 65535) levels: exactly within eps
    floats = Image.fromarray(((grey + 0.5) / 256).astype(np.float32))
    out = uad.protect(floats, tiny_sam, config=config)
    assert out.mode == "F"
    diff = np.abs(np.asarray(out, np.float64) - np.asarray(floats, np.float64))
    assert 0 < diff.max() <= config.eps


def test_protect_returns_the_kind_it_was_given(tiny_sam):
    config = uad.UADConfig(steps=2, deform_steps=1, proxy_steps=1)
    pixels = small_photo()
    out = uad.protect(pixels, tiny_sam, config=config)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    assert 0 < np.abs(out.astype(int) - pixels).max() <= 8

    rgba = Image.fromarray(
        np.dstack([pixels, np.arange(pixels.size // 3).reshape(pixels.shape[:2]) % 256]).astype(
            np.uint8
        )
    )
    out = uad.protect(rgba, tiny_sam, config=config)
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out)[..., 3], np.asarray(rgba)[..., 3])

    grey = Image.fromarray(pixels[..., 0])
    assert uad.protect(grey, tiny_sam, config=config).mode == "L"

    batch = torch.stack([uad.to_tensor(pixels)[0], uad.to_tensor(pixels[::-1].copy())[0]])
    stats = uad.Stats()
    out = uad.protect(batch, tiny_sam, config=config, stats=stats)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert (out - batch).abs().max() <= config.eps + 1e-6
    assert len(stats.feature_distance) == 2


def test_bfloat16_autocast_moves_features_like_float32(tiny_sam):
    image = uad.to_tensor(small_photo())
    distances = {}
    for dtype in ("float32", "bfloat16"):
        config = uad.UADConfig(steps=6, deform_steps=1, proxy_steps=1, dtype=dtype)
        adv, _, stats = uad.attack(image, tiny_sam, config)
        assert adv.dtype == torch.float32 and (adv - image).abs().max() <= config.eps + 1e-6
        distances[dtype] = stats.feature_distance[0]
    noise = torch.empty(image.shape).uniform_(-8 / 255, 8 / 255, generator=torch.Generator())
    with torch.no_grad():
        f = lambda x: uad.encoder_features(tiny_sam, x, (3, 4, 5, 6))
        random = uad.feature_distance(f(uad.project(image + noise, image, 8 / 255)), f(image))
    assert distances["bfloat16"] > 2 * random.item()
    assert 0.5 < distances["bfloat16"] / distances["float32"] < 2


def test_layers_beyond_the_encoder_are_an_error(tiny_sam):
    with pytest.raises(uad.UADError, match="blocks 0..7"):
        uad.attack(uad.to_tensor(small_photo()), tiny_sam, uad.UADConfig(layers=(3, 8)))


def test_identical_features_report_a_distance_of_zero_not_below(tiny_sam):
    image = uad.to_tensor(small_photo())
    stats = uad.attack(image, tiny_sam, uad.UADConfig(steps=0, deform_steps=0)).stats
    assert stats.feature_distance == [0.0]


# ------------------------------------------------------------------------------------------
# Baselines: aa (towards another image's features) and noise


def test_aa_moves_features_towards_the_other_image_more_than_noise(tiny_sam):
    image = uad.to_tensor(small_photo())
    other = uad.to_tensor(small_photo((80, 80))[::-1].copy())
    f = lambda x: uad.encoder_features(tiny_sam, x, (3, 4, 5, 6))
    towards = {}
    for preset in ("aa", "noise"):
        config = uad.preset_config(preset, steps=8, seed=3)
        result = uad.attack(image, tiny_sam, config, target_image=other if preset == "aa" else None)
        assert (result.adv - image).abs().max() <= config.eps + 1e-6
        assert (result.stats.forwards, result.stats.backwards) == uad.encoder_passes(config)
        with torch.no_grad():
            towards[preset] = uad.feature_distance(f(result.adv), f(other)).item()
    with torch.no_grad():
        start = uad.feature_distance(f(image), f(other)).item()
    assert towards["aa"] < 0.9 * start and towards["aa"] < towards["noise"]


def test_the_noise_baseline_needs_no_surrogate(tiny_sam):
    """uad.add_noise draws what attack's noise baseline draws, per image from its own generator,
    without a surrogate (reproduce.py's noise attack loads none)."""
    image = torch.cat([uad.to_tensor(small_photo()), uad.to_tensor(small_photo()[::-1].copy())])
    config = uad.preset_config("noise", seed=5)
    alone = uad.add_noise(image, config)
    assert torch.equal(alone, uad.attack(image, tiny_sam, config).adv)
    assert torch.equal(alone[1:], uad.add_noise(image[1:], config))  # its own generator
    assert 0 < (alone - image).abs().max() <= config.eps + 1e-6


def test_each_image_draws_its_own_numbers_the_same_alone_or_in_a_batch(tiny_sam):
    a, b = uad.to_tensor(small_photo((64, 48))), uad.to_tensor(small_photo((64, 48))).flip(-1)
    config = uad.UADConfig(steps=1, deform_steps=1, proxy_steps=1, random_start=True, seed=3)
    # two images of one batch start from different initial flows and random starts
    flows = [
        uad.draws(g, (1, 4, 2, 6, 6), torch.randn) for g in uad.generators(torch.cat([a, b]), 3)
    ]
    assert not torch.equal(flows[0], flows[1])
    noise = uad.add_noise(torch.cat([a, a, b]), config) - torch.cat([a, a, b])
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    # an image is attacked the same alone and in a batch, and another seed draws otherwise
    batch = uad.attack(torch.cat([a, b]), tiny_sam, config).adv
    assert torch.equal(uad.attack(b, tiny_sam, config).adv[0], batch[1])
    other = uad.generators(a, 4)[0].initial_seed()
    assert other != uad.generators(a, 3)[0].initial_seed()
