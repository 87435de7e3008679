"""Shared fixtures: tiny random-init SAM models built from segment_anything's own classes.

A real ViT-B takes about 14 s per forward pass at 1024 on two cores; these take a fraction of a
second. They are saved as .pth checkpoints and loaded through uad.load_sam, the code path real
checkpoints take, with uad.SAM_ARCHS patched to the tiny shapes.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # two cores: oversubscription makes the suite many times slower

import uad  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The same keys as uad.SAM_ARCHS, so every code path that names a model type works unchanged.
TINY_ARCHS = {
    "vit_b": dict(embed_dim=64, depth=8, num_heads=2, global_attn_indexes=()),
    "vit_l": dict(embed_dim=96, depth=8, num_heads=2, global_attn_indexes=()),
    "vit_h": dict(embed_dim=128, depth=8, num_heads=4, global_attn_indexes=()),
}


def build_tiny_sam(model_type: str, seed: int = 0):
    """A random-init SAM with a tiny encoder; positional tables randomised too (not zeros)."""
    from segment_anything.build_sam import _build_sam

    a = TINY_ARCHS[model_type]
    torch.manual_seed(seed)
    sam = _build_sam(
        encoder_embed_dim=a["embed_dim"],
        encoder_depth=a["depth"],
        encoder_num_heads=a["num_heads"],
        encoder_global_attn_indexes=list(a["global_attn_indexes"]),
    )
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.02)
    return sam.eval()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{model_type: path} of tiny random-init checkpoints saved once per test session."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for i, model_type in enumerate(TINY_ARCHS):
        paths[model_type] = folder / f"tiny_{model_type}.pth"
        torch.save(build_tiny_sam(model_type, seed=i).state_dict(), paths[model_type])
    return paths


@pytest.fixture
def tiny_archs(monkeypatch):
    """Points uad.SAM_ARCHS at the tiny shapes for the duration of a test."""
    monkeypatch.setattr(uad, "SAM_ARCHS", TINY_ARCHS)
    return TINY_ARCHS


@pytest.fixture
def tiny_sam(tiny_archs, tiny_checkpoints):
    """The tiny vit_b, loaded through uad.load_sam."""
    return uad.load_sam("vit_b", tiny_checkpoints["vit_b"], "cpu")


@pytest.fixture
def example_image(tmp_path):
    """A copy of a real example photo (coffee, 600 x 400) that a test may modify freely."""
    dst = tmp_path / "coffee.png"
    shutil.copy(EXAMPLES / "coffee.png", dst)
    return dst


def small_photo(size=(96, 64)) -> np.ndarray:
    """A real photo reduced to `size` (w, h), uint8 (h, w, 3): fast to attack in tests."""
    from PIL import Image

    with Image.open(EXAMPLES / "chelsea.png") as im:
        return np.array(im.convert("RGB").resize(size, Image.BILINEAR))
