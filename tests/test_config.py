"""UADConfig in library units, checking its own bounds; surrogates refusing settings they cannot
honour; protect never loading a model by itself; the old names forwarded with a warning."""

import math
import warnings

import numpy as np
import pytest

import uad
import unsegment.cli
import unsegment.models
from helpers import small_photo


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
