"""Every model family eval.py accepts, through its real package (sam2, segment_anything_hq,
mobile_sam): random-init models from the package's own builders, saved as checkpoints and loaded
through uad.load_model, the path official checkpoints take.

A test skips with the reason where its package is absent; CI installs them all (setup.py's
`variants` extra).
"""

import sys

import pytest
import torch

import uad
from helpers import TINY_ARCHS

# SAM-HQ's decoder reads the encoder's output after its first global-attention block, so its tiny
# ViTs need one (SAM's tiny shapes in helpers.py have none)
TINY_HQ_ARCHS = {t: {**a, "global_attn_indexes": (a["depth"] - 1,)} for t, a in TINY_ARCHS.items()}


def save_random(name: str, path, seed: int = 0):
    """A random-init `name` from its package's builder, saved as a state dict; returns it."""
    torch.manual_seed(seed)
    model = uad.build_model(name)
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture
def tiny_hq(monkeypatch):
    """SAM-HQ's ViTs (and SAM's) at tiny shapes for the duration of a test."""
    pytest.importorskip("segment_anything_hq", reason="segment-anything-hq is not installed")
    pytest.importorskip("timm", reason="timm (imported by segment_anything_hq) is not installed")
    monkeypatch.setattr(uad, "SAM_ARCHS", TINY_HQ_ARCHS)


def test_load_model_loads_the_saved_weights_frozen_in_eval_mode(tiny_hq, tmp_path):
    saved = save_random("hq_vit_b", tmp_path / "hq.pth", seed=3)
    model = uad.load_model("hq_vit_b", tmp_path / "hq.pth")
    assert type(model).__module__.startswith("segment_anything_hq")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for (key, a), b in zip(saved.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_checkpoint_of_another_family_is_refused_naming_what_is_extra(
    tiny_hq, tiny_checkpoints, tmp_path
):
    save_random("hq_vit_b", tmp_path / "hq.pth")
    with pytest.raises(uad.UADError) as e:
        uad.load_model("vit_b", tmp_path / "hq.pth")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'hq.pth'}: not a vit_b checkpoint: ")
    assert "tensor(s) that vit_b does not have (mask_decoder.hf_token.weight" in message
    assert "\n" not in message
    # and the other way round: SAM's checkpoint lacks the HQ decoder's tensors
    with pytest.raises(uad.UADError, match=r"of hq_vit_b's tensor\(s\) missing \(mask_decoder\."):
        uad.load_model("hq_vit_b", tiny_checkpoints["vit_b"])


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tiny_hq, tmp_path):
    state = save_random("hq_vit_b", tmp_path / "hq.pth").state_dict()
    state["mask_decoder.hf_token.weight"] = torch.zeros(2, 256)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(uad.UADError) as e:
        uad.load_model("hq_vit_b", tmp_path / "bad.pth")
    assert str(e.value) == (
        f"{tmp_path / 'bad.pth'}: weights do not fit hq_vit_b: mask_decoder.hf_token.weight is "
        "(2, 256) in the checkpoint, (1, 256) in the model"
    )


def test_the_missing_module_named_is_the_one_really_missing(monkeypatch):
    pytest.importorskip("segment_anything_hq", reason="segment-anything-hq is not installed")
    for module in [m for m in sys.modules if m == "timm" or m.startswith(("timm.", "segment_"))]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "timm", None)  # timm absent, segment_anything_hq present
    with pytest.raises(uad.UADError) as e:
        uad.load_model("hq_vit_b", "unused.pth")
    assert str(e.value) == (
        "model hq_vit_b needs the timm package (imported by segment_anything_hq), which is not "
        "installed: pip install segment-anything-hq timm"
    )
