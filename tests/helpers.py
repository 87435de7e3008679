"""Helpers shared by the tests: tiny random-init SAM models and small real photos.

A real ViT-B takes about 14 s per forward pass at 1024 on two cores; these take a fraction of a
second. Tests save them as .pth checkpoints and load them through unsegment.models.load_sam, the code path
real checkpoints take, with unsegment.models.SAM_ARCHS patched to the tiny shapes (see conftest.py).
"""

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import unsegment.models

ROOT = Path(__file__).resolve().parent.parent  # the repository
EXAMPLES = ROOT / "examples"

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


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels, with almost no data behind it."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )
