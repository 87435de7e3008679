"""Surrogates beyond SAM v1: SAM 2's Hiera, MobileSAM's TinyViT and SAM-HQ's ViT, each through
its real package (sam2, mobile_sam, segment_anything_hq): random-init models from the packages'
own builders, their preprocessing and block outputs against the packages' own code, and an
ensemble of SAM and SAM 2 through the command line.

The SAM 2 models are the package's tiny config at image_size 128 (a hydra override of the
package's own config, which Hiera allows: its positional table is interpolated), so that an
encoder pass costs milliseconds; uad respects a model's own input size.
"""

import dataclasses
import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image

import uad
import unsegment.cost
import unsegment.images
import unsegment.models
from helpers import EXAMPLES, small_photo

FAST = ["--preset", "no-fidelity", "--steps", "3", "--deform-steps", "2"]


def randomise_zeros(model: torch.nn.Module, seed: int = 0) -> None:
    """Draws the positional tables and attention biases that the packages initialise to zero,
    so that a test would see them used wrongly (zero biases elsewhere are left: drawn, they
    would drown a random-init network's small activations)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("pos" in name or "attention_biases" in name) and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def sam2_128(monkeypatch, tmp_path):
    """sam2.1_t at image_size 128 for the duration of a test; returns the path of a random-init
    checkpoint of it, nested under "model" as the official files are."""
    pytest.importorskip("sam2", reason="sam2 is not installed")
    spec = unsegment.models.MODELS["sam2.1_t"]
    small = dataclasses.replace(spec, overrides=(*spec.overrides, "++model.image_size=128"))
    monkeypatch.setitem(unsegment.models.MODELS, "sam2.1_t", small)
    torch.manual_seed(1)
    model = unsegment.models.build_model("sam2.1_t")
    randomise_zeros(model.image_encoder)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def tinyvit_sam(img_size: int):
    """MobileSAM from its package's registry, its TinyViT rebuilt for img_size x img_size inputs
    with the registry's own hyperparameters (the state dict's tensors are the same)."""
    pytest.importorskip("timm", reason="timm (imported by mobile_sam) is not installed")
    pytest.importorskip("mobile_sam", reason="mobilesam-mirror is not installed")
    from mobile_sam import sam_model_registry
    from mobile_sam.modeling import TinyViT

    torch.manual_seed(2)
    sam = sam_model_registry["vit_t"]()
    own = sam.image_encoder
    small = TinyViT(
        img_size=img_size,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        drop_path_rate=0.0,
        layer_lr_decay=0.8,
    )
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(small) == shapes(own)
    sam.image_encoder = small.eval()
    randomise_zeros(sam.image_encoder)
    return sam.eval().requires_grad_(False)


def block_outputs(blocks, run) -> dict:
    """{index: output} of every module in `blocks` while run() runs, and how often each ran."""
    outputs, calls = {}, [0] * len(blocks)

    def hook(i):
        def record(module, args, output):
            outputs[i] = output
            calls[i] += 1

        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return outputs, calls


# ------------------------------------------------------------------------------------------
# Each family: its table, its preprocessing, its features, the blocks it runs


def test_stage_tables_match_the_packages():
    pytest.importorskip("sam2", reason="sam2 is not installed")
    from hydra import compose
    from sam2.modeling.backbones.hieradet import Hiera

    default = inspect.signature(Hiera).parameters["stages"].default  # b+ leaves it unset
    sam2_names = [n for n, spec in unsegment.models.MODELS.items() if spec.family == "sam2"]
    assert sorted(sam2_names + ["mobile_sam"]) == sorted(unsegment.models.SURROGATE_STAGES)
    for name in sam2_names:
        trunk = compose(config_name=unsegment.models.MODELS[name].arch).model.image_encoder.trunk
        assert tuple(trunk.get("stages", default)) == unsegment.models.SURROGATE_STAGES[name], name
    layers = tinyvit_sam(128).image_encoder.layers
    assert (
        tuple(len(stage.blocks) for stage in layers)
        == unsegment.models.SURROGATE_STAGES["mobile_sam"]
    )


class Stop(Exception):
    pass


def encoder_input(model, predict) -> torch.Tensor:
    """What predict() feeds model.image_encoder, which is stopped before it runs."""
    seen = {}

    def capture(module, args):
        seen["x"] = args[0]
        raise Stop

    handle = model.image_encoder.register_forward_pre_hook(capture)
    try:
        with pytest.raises(Stop):
            predict()
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "rocket.jpg"])
def test_sam2_preprocessing_matches_its_image_predictor(sam2_128, name):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = unsegment.models.load_model("sam2.1_t", sam2_128)
    pixels = unsegment.images.read_image(EXAMPLES / name).pixels
    for size in (128, 1024):  # these photos are downscaled to 128, upscaled to 1024
        model.image_size = size
        theirs = encoder_input(model, lambda: SAM2ImagePredictor(model).set_image(pixels))
        ours = uad.sam2_input(uad.to_tensor(pixels), model.image_size)
        assert ours.shape == theirs.shape == (1, 3, size, size)
        assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["chelsea.png", "rocket.jpg"])
def test_mobile_sam_preprocessing_matches_its_predictor(name):
    pytest.importorskip("timm", reason="timm (imported by mobile_sam) is not installed")
    pytest.importorskip("mobile_sam", reason="mobilesam-mirror is not installed")
    from mobile_sam import SamPredictor, sam_model_registry

    sam = sam_model_registry["vit_t"]()
    pixels = unsegment.images.read_image(EXAMPLES / name).pixels
    theirs = encoder_input(sam, lambda: SamPredictor(sam).set_image(pixels))
    ours = uad.sam_input(uad.to_tensor(pixels), sam)
    grey_levels = ((ours - theirs) * sam.pixel_std).abs()
    # PIL resizes in fixed point: a few pixels land one grey level away from our float resize
    assert ours.shape == theirs.shape and grey_levels.max() <= 1 + 1e-3
    assert grey_levels.mean() < 0.25


def test_hiera_features_are_the_trunks_own_block_outputs_and_later_blocks_never_run(sam2_128):
    model = unsegment.models.load_model("sam2.1_t", sam2_128)
    surrogate = uad.Surrogate.of(model, "sam2.1_t")
    assert isinstance(surrogate, uad.HieraSurrogate)
    config = uad.UADConfig(stage_layers=(0, 2, 3))
    assert surrogate.third_stage == 3 and surrogate.depth == 12
    assert surrogate.blocks(config) == (3, 5, 6) and surrogate.blocks(uad.UADConfig()) == (
        3,
        4,
        5,
        6,
    )
    image = uad.to_tensor(small_photo())
    blocks = model.image_encoder.trunk.blocks
    theirs, _ = block_outputs(blocks, lambda: model.image_encoder(uad.sam2_input(image, 128)))
    ran_neck = []
    model.image_encoder.neck.register_forward_hook(lambda *_: ran_neck.append(1))
    _, calls = block_outputs(blocks, lambda: surrogate.features(image, config))
    with torch.no_grad():
        feats = surrogate.features(image, config)
    assert calls == [1] * 7 + [0] * 5 and not ran_neck
    assert [f.shape for f in feats] == [(1, 8, 8, 384)] * 3  # stride 16 at 128
    for f, i in zip(feats, (3, 5, 6)):
        assert torch.equal(f, theirs[i])


def test_tinyvit_features_are_the_packages_own_block_outputs_and_later_blocks_never_run():
    sam = tinyvit_sam(128)
    surrogate = uad.Surrogate.of(sam, "mobile_sam")
    assert isinstance(surrogate, uad.TinyViTSurrogate)
    assert (surrogate.third_stage, surrogate.depth) == (4, 12)
    enc = sam.image_encoder
    blocks = [b for stage in enc.layers for b in stage.blocks]
    x = uad.to_tensor(small_photo())

    def package_stages():  # TinyViT.forward_features without its neck (it assumes 1024)
        h = enc.patch_embed(uad.sam_input(x, sam))
        for stage in enc.layers:
            h = stage(h)

    theirs, _ = block_outputs(blocks, package_stages)
    for stage_layers, ran in [((0, 1, 2, 3), 8), ((1, 6), 11)]:  # 6: the last stage's first
        config = uad.UADConfig(stage_layers=stage_layers)
        _, calls = block_outputs(blocks, lambda: surrogate.features(x, config))
        assert calls == [1] * ran + [0] * (12 - ran)
        with torch.no_grad():
            feats = surrogate.features(x, config)
        for f, i in zip(feats, surrogate.blocks(config)):
            assert torch.equal(f, theirs[i])
    assert feats[-1].shape == (1, 8 * 8, 320)  # the last stage keeps stride 16


@pytest.mark.parametrize("name", ["vit_b", "hq_vit_b"])
def test_sam_and_sam_hq_are_vit_surrogates_whose_features_are_their_encoders_own(
    name, monkeypatch, tmp_path
):
    if name.startswith("hq_"):
        pytest.importorskip("segment_anything_hq", reason="segment-anything-hq is not installed")
        pytest.importorskip(
            "timm", reason="timm (imported by segment_anything_hq) is not installed"
        )
    from helpers import TINY_ARCHS

    # SAM-HQ's decoder reads the output of the encoder's first global-attention block
    arch = {**TINY_ARCHS["vit_b"], "global_attn_indexes": (5,)}
    monkeypatch.setattr(unsegment.models, "SAM_ARCHS", {**TINY_ARCHS, "vit_b": arch})
    torch.manual_seed(3)
    model = unsegment.models.build_model(name)
    randomise_zeros(model.image_encoder)
    torch.save(model.state_dict(), tmp_path / "sam.pth")
    model = unsegment.models.load_model(name, tmp_path / "sam.pth")
    surrogate = uad.Surrogate.of(model)
    assert isinstance(surrogate, uad.ViTSurrogate)
    image = uad.to_tensor(small_photo())
    blocks = model.image_encoder.blocks
    theirs, _ = block_outputs(blocks, lambda: model.image_encoder(uad.sam_input(image, model)))
    with torch.no_grad():
        feats = surrogate.features(image, uad.UADConfig())
    for f, i in zip(feats, (3, 4, 5, 6)):
        assert torch.equal(f, theirs[i])


def test_mobile_sam_loads_through_load_model_as_a_tinyvit_surrogate(tmp_path):
    pytest.importorskip("timm", reason="timm (imported by mobile_sam) is not installed")
    pytest.importorskip("mobile_sam", reason="mobilesam-mirror is not installed")
    torch.manual_seed(4)
    torch.save(unsegment.models.build_model("mobile_sam").state_dict(), tmp_path / "mobile_sam.pt")
    surrogate = uad.Surrogate.of(
        unsegment.models.load_model("mobile_sam", tmp_path / "mobile_sam.pt")
    )
    assert isinstance(surrogate, uad.TinyViTSurrogate) and surrogate.input_size == 1024
    assert surrogate.blocks(uad.UADConfig()) == (4, 5, 6, 7)


def test_a_checkpoint_of_another_family_given_as_vit_b_names_its_family(cli, sam2_128, tmp_path):
    """A MobileSAM or SAM 2 checkpoint passed as --checkpoint (a SAM ViT's flag) is one line
    saying what it is and how to pass it, not "no image encoder"."""
    pytest.importorskip("timm", reason="timm (imported by mobile_sam) is not installed")
    pytest.importorskip("mobile_sam", reason="mobilesam-mirror is not installed")
    torch.manual_seed(4)
    mobile = tmp_path / "mobile_sam.pt"
    torch.save(unsegment.models.build_model("mobile_sam").state_dict(), mobile)
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    expected = {
        mobile: f"{mobile}: a MobileSAM (TinyViT encoder) checkpoint, not vit_b; load it as "
        "mobile_sam (uad.py --surrogate mobile_sam=PATH, eval.py --models mobile_sam=PATH)",
        sam2_128: f"{sam2_128}: a SAM 2.1 (Hiera encoder, 12 blocks) checkpoint, not vit_b; load "
        "it as sam2.1_t (uad.py --surrogate sam2.1_t=PATH",
    }
    for path, message in expected.items():
        args = [tmp_path / "in.png", tmp_path / "o.png", "--checkpoint", path, "--quiet"]
        code, out, err = cli(*args, checkpoint=None)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_a_model_of_no_family_is_refused():
    with pytest.raises(uad.UADError, match="cannot use a Linear as a surrogate"):
        uad.Surrogate.of(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------
# Attacks through the new families, and ensembles


def uniform_noise(image, eps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.empty(image.shape).uniform_(-eps, eps, generator=gen)
    return uad.quantize(uad.project(image + noise, image, eps), image, eps)


def test_each_family_alone_moves_its_features_further_than_noise(sam2_128):
    image = uad.to_tensor(small_photo())
    config = uad.preset_config("no-fidelity", steps=4, deform_steps=2)
    noisy = uniform_noise(image, config.eps)
    for model in (unsegment.models.load_model("sam2.1_t", sam2_128), tinyvit_sam(128)):
        surrogate = uad.Surrogate.of(model)
        adv, _, stats = uad.attack(image, surrogate, config)
        assert (stats.forwards, stats.backwards) == uad.encoder_passes(config)
        assert (adv - image).abs().max() <= config.eps + 1e-6
        with torch.no_grad():
            f = lambda x: surrogate.features(x, config)  # noqa: E731
            moved = uad.feature_distance(f(adv), f(image)).item()
            by_noise = uad.feature_distance(f(noisy), f(image)).item()
        assert moved > 2 * by_noise, surrogate.family


def test_protect_takes_a_surrogate_or_a_list_and_averages_their_distances(tiny_sam, sam2_128):
    sam2 = unsegment.models.load_model("sam2.1_t", sam2_128)
    x = uad.to_tensor(small_photo())
    config = uad.preset_config("no-fidelity", steps=2, deform_steps=1)
    stats = uad.Stats()
    adv = uad.protect(x, [tiny_sam, uad.Surrogate.of(sam2)], config=config, stats=stats)
    assert 0 < (adv - x).abs().max() <= config.eps + 1e-6
    assert (stats.forwards, stats.backwards) == uad.encoder_passes(config)  # per surrogate
    with torch.no_grad():
        each = [
            uad.feature_distance(s.features(adv, config), s.features(x, config))
            for s in uad.surrogates_of([tiny_sam, sam2])
        ]
    assert stats.feature_distance[0] == pytest.approx(torch.stack(each).mean().item(), rel=1e-4)
    pixels = small_photo()
    out = uad.protect(pixels, uad.Surrogate.of(sam2), config=config)
    assert out.dtype == np.uint8 and 0 < np.abs(out.astype(int) - pixels).max() <= 8


def test_layers_beyond_a_surrogate_are_an_error_naming_it(sam2_128):
    surrogate = uad.Surrogate.of(unsegment.models.load_model("sam2.1_t", sam2_128), "sam2.1_t")
    with pytest.raises(uad.UADError, match=r"stage_layers 0,9: sam2.1_t has blocks 0..8, counted"):
        uad.attack(uad.to_tensor(small_photo()), [surrogate], uad.UADConfig(stage_layers=(0, 9)))


def test_an_ensemble_of_sam_and_sam2_through_the_cli(cli, tiny_checkpoints, sam2_128, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    ensemble = f"vit_b={tiny_checkpoints['vit_b']},sam2.1_t={sam2_128}"
    outputs = [tmp_path / "a.png", tmp_path / "b.png"]
    run = lambda out, *more: cli(  # noqa: E731
        tmp_path / "in.png",
        out,
        "--surrogate",
        ensemble,
        *FAST,
        "--seed",
        4,
        *more,
        checkpoint=None,
    )
    code, out, err = run(outputs[0], "--device", "cpu")
    assert code == 0, err
    assert "surrogates vit_b + sam2.1_t on cpu" in err
    assert "(5 encoder forwards, 3 backwards through each of the 2 surrogates" in err
    assert out.strip().endswith("(no-fidelity preset, surrogates vit_b + sam2.1_t)")
    code, _, err = run(outputs[1], "--quiet")
    assert code == 0, err
    assert outputs[0].read_bytes() == outputs[1].read_bytes()

    clean = uad.to_tensor(small_photo())
    saved = uad.to_tensor(unsegment.images.read_image(outputs[0]).pixels)
    assert 0 < (saved - clean).abs().max() * 255 <= 8 + 1e-4
    noisy = uniform_noise(clean, 8 / 255)
    config = uad.UADConfig()
    for name, path in [("vit_b", tiny_checkpoints["vit_b"]), ("sam2.1_t", sam2_128)]:
        surrogate = uad.Surrogate.of(unsegment.models.load_model(name, path), name)
        with torch.no_grad():
            f = lambda x: surrogate.features(x, config)  # noqa: E731
            moved = uad.feature_distance(f(saved), f(clean)).item()
            by_noise = uad.feature_distance(f(noisy), f(clean)).item()
        assert moved > 2 * by_noise, name


def surrogate_errors(tmp_path, checkpoint):
    good = tmp_path / "good.png"
    Image.fromarray(small_photo()).save(good)
    o = tmp_path / "o.png"
    return {
        "unknown": ([good, o, "--surrogate", "vit_x"], "unknown surrogate 'vit_x'; choose from"),
        "hq": (
            [good, o, "--surrogate", "hq_vit_l"],
            "hq_vit_l: SAM-HQ keeps SAM's image encoder frozen, so its surrogate is vit_l",
        ),
        "fastsam": ([good, o, "--surrogate", "fastsam"], "fastsam: FastSAM is a YOLOv8"),
        "twice": ([good, o, "--surrogate", "vit_b,vit_b"], "vit_b is named twice"),
        "empty path": ([good, o, "--surrogate", "vit_b="], "vit_b=: no checkpoint after '='"),
        "missing file": (
            [good, o, "--surrogate", f"vit_b={checkpoint},sam2.1_t={tmp_path / 'no.pt'}"],
            "no.pt: no such checkpoint file",
        ),
        "with --model-type": (
            [good, o, "--surrogate", "vit_b", "--model-type", "vit_l"],
            "--surrogate replaces --model-type and --checkpoint",
        ),
        "with --checkpoint": (
            [good, o, "--surrogate", "vit_b", "--checkpoint", checkpoint],
            "--surrogate replaces --model-type and --checkpoint",
        ),
        "stage layers": (
            [good, o, "--surrogate", f"vit_b={checkpoint},sam2.1_t", "--stage-layers", "0,9"],
            "--stage-layers 0,9: sam2.1_t has blocks 0..8, counted from the first of its third",
        ),
        "layers": (
            [good, o, "--surrogate", "mobile_sam,vit_b", "--layers", "3,8"],
            "--layers 3,8: vit_b has blocks 0..7",
        ),
    }


SURROGATE_ERRORS = [
    "unknown",
    "hq",
    "fastsam",
    "twice",
    "empty path",
    "missing file",
    "with --model-type",
    "with --checkpoint",
    "stage layers",
    "layers",
]


@pytest.mark.parametrize("case", SURROGATE_ERRORS)
def test_surrogate_errors_are_one_line_before_any_model_loads(
    cli, tiny_checkpoints, tmp_path, no_model, case
):
    pytest.importorskip("sam2", reason="sam2 is not installed")
    pytest.importorskip("mobile_sam", reason="mobilesam-mirror is not installed")
    args, message = surrogate_errors(tmp_path, tiny_checkpoints["vit_b"])[case]
    code, out, err = cli(*args, checkpoint=None)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "o.png").exists()


def test_forward_gflops_prices_vit_b_at_the_constant_and_grows_with_the_blocks(sam2_128):
    torch.manual_seed(0)
    vit_b = uad.Surrogate.of(unsegment.models.build_sam("vit_b"))
    assert unsegment.cost.forward_gflops(vit_b, uad.UADConfig()) == pytest.approx(
        unsegment.cost.CPU_PASS_GFLOPS, 1e-4
    )
    hiera = uad.Surrogate.of(unsegment.models.load_model("sam2.1_t", sam2_128))
    counts = [
        unsegment.cost.forward_gflops(hiera, uad.UADConfig(stage_layers=(i,))) for i in range(4)
    ]
    assert 0 < counts[0] < counts[1] < counts[2] < counts[3]
    one, both = (unsegment.cost.cpu_estimate(uad.UADConfig(), g, 2) for g in (100.0, 200.0))
    assert both == pytest.approx(2 * one)


def test_help_names_every_surrogate_and_says_sam_hq_needs_none(cli):
    code, out, _ = cli("--help", checkpoint=None)
    flat = " ".join(out.split())
    names = [
        n
        for n, s in unsegment.models.MODELS.items()
        if s.family in unsegment.models.SURROGATE_FAMILIES
    ]
    assert code == 0 and len(names) == 14
    words = set(re.split(r"[\s,;()]+", flat))
    assert all(name in words for name in names), flat
    assert "SAM-HQ needs none of its own" in flat
    assert "--stage-layers I,J,.. hierarchical surrogates" in flat and "[0,1,2,3]" in flat
