"""UADConfig in library units, checking its own bounds; surrogates refusing settings they cannot
honour; protect never loading a model by itself, refusing bad inputs in one line and keeping
each tensor within eps in its own dtype; the old names forwarded with a warning."""

import math
import subprocess
import sys
import warnings

import numpy as np
import torch
import pytest

import uad
import unsegment.cli
import unsegment.models
from helpers import ROOT, small_photo


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "eps",
            2.0,
            "eps 2.0: must be at most 0.25",
        ),  # 2 = 510/255: CLI units given to the library
        ("eps", 8, "eps 8: must be at most 0.25"),
        ("eps", 0.0, "eps 0.0: must be above 0"),
        ("momentum", math.inf, "momentum inf: must be a finite number"),
        ("encoder_noise", math.inf, "encoder_noise inf: must be a finite number"),
        ("alpha", math.nan, "alpha nan: must be a finite number"),
        ("deform_lr", -math.inf, "deform_lr -inf: must be a finite number"),
        ("init_std", math.inf, "init_std inf: must be a finite number"),
        ("lambda_tv", math.inf, "lambda_tv inf: must be a finite number"),
        ("cell_size", math.inf, "cell_size inf: must be a finite number"),
    ],
)
def test_the_config_refuses_values_outside_its_bounds_naming_the_field(field, value, message):
    with pytest.raises(uad.UADError) as e:
        uad.UADConfig(**{field: value})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("field", ["layers", "stage_layers"])
def test_the_feature_blocks_are_one_or_more_indices_from_0(field):
    for blocks, shown in (((), ""), ((2, -1), "2,-1")):
        with pytest.raises(uad.UADError, match=f"^{field} {shown}: need one or more block"):
            uad.UADConfig(**{field: blocks})


def test_a_preset_given_cli_units_is_refused_not_run():
    with pytest.raises(uad.UADError, match="eps 8: must be at most"):
        uad.preset_config("noise", eps=8)
    assert uad.preset_config("noise", eps=64 / 255).eps == 64 / 255


def test_robust_is_parsed_once_per_value():
    config = uad.UADConfig(robust="jpeg:50-95,resize:0.5-1")
    assert config.publishing == (("jpeg", 50.0, 95.0), ("resize", 0.5, 1.0))
    assert config.publishing is config.publishing  # the same parse, not a new one per PGD step
    with pytest.raises(uad.UADError, match="'jpeg:50-20' is reversed; write jpeg:20-50"):
        uad.UADConfig(robust="jpeg:50-20")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(attention="sdpa"), "attention sdpa: surrogate mine (MobileSAM TinyViT)"),
        (dict(compile=True), "compile: surrogate mine (MobileSAM TinyViT)"),
    ],
)
def test_a_surrogate_refuses_a_setting_it_cannot_honour(settings, message):
    pytest.importorskip("mobile_sam")
    model = unsegment.models.build_model("mobile_sam")
    surrogate = uad.Surrogate.of(model, "mine")
    assert isinstance(surrogate, uad.TinyViTSurrogate)
    image = uad.to_tensor(small_photo((32, 24)))
    with pytest.raises(uad.UADError) as e:
        uad.attack(image, surrogate, uad.UADConfig(steps=1, deform_steps=0, **settings))
    assert str(e.value).startswith(message) and "only SAM v1 ViT surrogates" in str(e.value)


def test_the_cli_refuses_such_a_setting_before_any_model_loads(
    cli, example_image, tmp_path, no_model
):
    pytest.importorskip("sam2")
    code, out, err = cli(
        example_image, tmp_path / "out.png", "--surrogate", "sam2.1_t", "--attention", "sdpa",
        checkpoint=None,
    )  # fmt: skip
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "error: --attention sdpa: surrogate sam2.1_t (SAM 2 Hiera) runs its package's own "
        "blocks; only SAM v1 ViT surrogates take it"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coffee.png"]


def test_protect_needs_a_model_and_never_loads_one(no_model):
    with pytest.raises(uad.UADError, match="protect needs the surrogate model"):
        uad.protect(np.zeros((32, 32, 3), np.uint8), None)


def test_moved_names_are_forwarded_with_a_warning():
    with pytest.warns(DeprecationWarning, match="uad.load_sam moved to unsegment.models.load_sam"):
        assert uad.load_sam is unsegment.models.load_sam
    with pytest.warns(DeprecationWarning, match="uad.main moved to unsegment.cli.main"):
        assert uad.main is unsegment.cli.main
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
            uad.no_such_name


# The library's bad inputs: each is one UADError line, or a result within eps of the input.
def _tiny_image(h, w):
    return uad.to_tensor(small_photo((w, h)))


LIBRARY_CASES = {
    "values above 1": (
        lambda: _tiny_image(32, 40) * 2,
        "values run from 0.09412 to 1.608, not within [0, 1]",
    ),
    "values below 0": (lambda: _tiny_image(32, 40) - 1, "not within [0, 1]"),
    "a NaN pixel": (
        lambda: _tiny_image(32, 40).index_put_((torch.tensor(0),) * 4, torch.tensor(math.nan)),
        "image holds NaN or infinite values",
    ),
    "under 16 px": (lambda: _tiny_image(10, 40), "image is 40x10, at least 16x16 needed"),
    "an integer tensor": (
        lambda: (_tiny_image(32, 40) * 255).to(torch.uint8),
        "expected a float (B, 1 or 3, H, W) tensor",
    ),
    "a list": (lambda: [[0.5]], "cannot protect a list"),
    "a float array": (lambda: np.zeros((32, 32, 3)), "expected a uint8 (H, W, 3) or (H, W) array"),
}


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_bad_library_input_is_one_line(tiny_sam, case):
    make, message = LIBRARY_CASES[case]
    with pytest.raises(uad.UADError) as e:
        uad.protect(make(), tiny_sam, config=uad.UADConfig(steps=1, deform_steps=1))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_tensor_comes_back_within_eps_in_its_own_dtype(tiny_sam, dtype):
    image = _tiny_image(32, 40).to(dtype)
    config = uad.preset_config("noise", eps=8 / 255)  # every pixel moved to the edge of the ball
    adv = uad.protect(image, tiny_sam, config=config)
    assert adv.dtype == dtype
    distance = (adv.double() - image.double()).abs()
    assert distance.max().item() <= config.eps
    assert distance.max().item() > 7 / 255  # still a perturbation, not the image handed back


def test_a_tensor_whose_cast_rounds_past_the_budget_is_pulled_back():
    image = torch.arange(0.2, 0.7, 1 / 512).half().view(1, 1, 1, -1)  # many round past eps
    eps = 8 / 255
    adv = image.float() + eps  # exactly at the budget in float32; float16 may round past it
    out = uad.cast_within(adv, image, eps)
    assert out.dtype == torch.float16
    assert (out.double() - image.double()).abs().max().item() <= eps
    assert (
        adv.half().double() - image.double()
    ).abs().max().item() > eps  # the plain cast does not


def test_a_copied_uad_py_without_the_package_says_what_it_needs(tmp_path):
    code = (
        "import runpy, sys; sys.modules['unsegment'] = None; sys.argv = ['uad.py', 'a', 'b']; "
        f"runpy.run_path({str(ROOT / 'uad.py')!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        "error: uad.py's command line needs the unsegment package (unsegment.cli is missing): "
        "pip install -e . in its repository, or call uad.protect from Python"
    ]
