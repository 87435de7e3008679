"""Helpers shared by the tests: tiny random-init SAM models and small real photos.

A real ViT-B takes about 14 s per forward pass at 1024 on two cores; these take a fraction of a
second. Tests save them as .pth checkpoints and load them through unsegment.models.load_sam, the code path
real checkpoints take, with unsegment.models.SAM_ARCHS patched to the tiny shapes (see conftest.py).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import unsegment.models

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The same keys as unsegment.models.SAM_ARCHS, so every code path that names a model type works unchanged.
TINY_ARCHS = {
    "vit_b": dict(embed_dim=64, depth=8, num_heads=2, global_attn_indexes=()),
    "vit_l": dict(embed_dim=96, depth=8, num_heads=2, global_attn_indexes=()),
    "vit_h": dict(embed_dim=128, depth=8, num_heads=4, global_attn_indexes=()),
}


def build_tiny_sam(model_type: str, seed: int = 0):
    """A random-init SAM with a tiny encoder; positional tables randomised too (not zeros)."""
    torch.manual_seed(seed)
    sam = unsegment.models.build_sam(model_type, TINY_ARCHS[model_type])
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.02)
    return sam


def small_photo(size=(96, 64)) -> np.ndarray:
    """A real photo reduced to `size` (w, h), uint8 (h, w, 3): fast to attack in tests."""
    with Image.open(EXAMPLES / "chelsea.png") as im:
        return np.array(im.convert("RGB").resize(size, Image.BILINEAR))
