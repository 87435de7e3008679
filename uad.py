"""UAD: Unsegment Anything by Simulating Deformation (Lu, Yang, Wang, CVPR 2024).

Adds an imperceptible L-infinity perturbation to an image so that the Segment Anything family
fails to segment it, for any point or box prompt:

    python uad.py in.png out.png --eps 8

Stage 1 (deformation) optimises a flow field whose warp of the image is a structurally different
but natural-looking target whose encoder features stay reachable inside the budget. Stage 2
(feature simulation) runs L-infinity PGD pulling the image's encoder features towards the target's
and away from its own. As a library: `protect(image, sam, config=UADConfig())`.
"""

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import warp_kernel

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class UADConfig:
    # budget and stage 2 (feature simulation), in [0, 1] image units
    eps: float = 8 / 255  # L-infinity budget
    alpha: float = 2 / 255  # PGD step size
    steps: int = 40  # PGD steps of stage 2
    random_start: bool = False  # start stage 2 from U(-eps, eps) instead of zero
    momentum: float = 0.0  # MI-FGSM decay mu; 0 disables it (the reference's MI uses 1.0)
    input_noise: float = 0.0  # DI: std of Gaussian noise on the encoder input (reference: 4/255)
    layers: Sequence[int] = (3, 4, 5, 6)  # 0-based encoder blocks whose outputs are the features
    # stage 1 (deformation)
    deform_steps: int = 40  # Adam steps on the flow fields
    deform_lr: float = 10.0  # Adam learning rate, in pixels at SAM's 1024-pixel input scale
    num_flows: int = 4  # flow fields tiled into one mosaic flow
    control_points: int = 6  # each flow is a control_points x control_points bicubic grid
    init_std: float = 0.1  # initial displacement std, in units of one control-grid block
    cell_size: float = 300.0  # side of a mosaic cell, in pixels at the 1024 scale
    lambda_c: float = 0.05  # weight of the flow regulariser L_C
    lambda_tv: float = 1.0  # lambda_1: total variation of the flow (locally smooth)
    lambda_var: float = 1.0  # lambda_2: variance of the flow (globally near-uniform)
    lambda_f: float = 1.0  # weight of the fidelity term L_F (0 turns it off)
    proxy_steps: int = 4  # T_f: proxy PGD steps per deformation step (0 turns the loop off)
    padding: str = "border"  # how the warp samples outside the image: "border" | "reflection"
    # execution
    seed: int = 0
    dtype: str = "float32"  # encoder autocast dtype: "float32" | "bfloat16"
    impl: str = "auto"  # warp_kernel backend: "auto" | "cuda" | "cpp" | "torch"


# `paper` optimises the deformation with the live fidelity term, as the paper states. `reference`
# is what the authors' code effectively computes: its fidelity gradient never reaches the warp,
# so the deformation sees SSIM and the regulariser only and no proxy loop is needed.
PRESETS = {
    "paper": {},
    "reference": {"lambda_f": 0.0, "proxy_steps": 0},
}


def preset_config(name: str, **overrides) -> UADConfig:
    """Builds the config of preset `name` ("paper" or "reference"), with fields overridden."""
    if name not in PRESETS:
        raise UADError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return UADConfig(**{**PRESETS[name], **overrides})


class UADError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# -----------------------------------------------------------------------------------------------
# Segment Anything: architectures, checkpoints, preprocessing, encoder features

# encoder width, depth, heads and global-attention blocks, as in segment_anything.build_sam
SAM_ARCHS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
CHECKPOINT_URLS = {
    "vit_b": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $UNSEGMENT_CACHE, else ~/.cache/unsegment."""
    return Path(os.environ.get("UNSEGMENT_CACHE", "~/.cache/unsegment")).expanduser()


def download(url: str, dest: Path, sha256: str, quiet: bool = False) -> Path:
    """Downloads `url` to `dest` atomically, checking its SHA-256; returns `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, 0.0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if not quiet and (time.monotonic() - last > 0.5 or done == total):
                    last = time.monotonic()
                    of = f" / {total / 2**20:.0f} MiB ({100 * done / total:.0f}%)" if total else ""
                    print(f"\rdownloading {url}: {done / 2**20:.0f} MiB{of}", end="", file=sys.stderr)
        if not quiet:
            print(file=sys.stderr)
        if digest.hexdigest() != sha256:
            raise UADError(f"{url}: SHA-256 mismatch (got {digest.hexdigest()}, want {sha256})")
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UADError(
            f"{url}: download failed ({reason}); download it by hand and pass --checkpoint PATH"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_checkpoint(model_type: str, quiet: bool = False) -> Path:
    """The official checkpoint of `model_type` in the cache folder, downloaded if missing."""
    if model_type not in CHECKPOINT_URLS:
        raise UADError(f"no official checkpoint for model type {model_type!r}; pass --checkpoint")
    url, sha256 = CHECKPOINT_URLS[model_type]
    path = cache_dir() / url.rsplit("/", 1)[1]
    return path if path.is_file() else download(url, path, sha256, quiet=quiet)


def checkpoint_arch(state: dict) -> dict:
    """Encoder width and depth of a SAM state dict, read from its tensor shapes."""
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    return dict(embed_dim=state["image_encoder.pos_embed"].shape[-1], depth=depth)


def load_sam(model_type: str = "vit_b", checkpoint=None, device="cpu", quiet: bool = False):
    """Builds SAM `model_type` ("vit_b" | "vit_l" | "vit_h") and loads its weights.

    Args:
      model_type: the architecture; a checkpoint of another one is an error.
      checkpoint: path to a .pth state dict; None takes the official one from the cache folder
        (see `cache_dir`), downloading it from Meta's URL on first use.
      device: where the model lives.
      quiet: no download progress line.

    Returns:
      segment_anything.modeling.Sam in eval mode with frozen parameters.
    """
    from segment_anything.build_sam import _build_sam

    if model_type not in SAM_ARCHS:
        raise UADError(f"unknown model type {model_type!r}; choose from {', '.join(SAM_ARCHS)}")
    path = Path(checkpoint) if checkpoint is not None else find_checkpoint(model_type, quiet)
    if not path.is_file():
        raise UADError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UADError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(state, dict) or "image_encoder.pos_embed" not in state:
        raise UADError(f"{path}: not a Segment Anything checkpoint")
    arch, want = checkpoint_arch(state), SAM_ARCHS[model_type]
    if (arch["embed_dim"], arch["depth"]) != (want["embed_dim"], want["depth"]):
        match = [t for t, a in SAM_ARCHS.items() if (a["embed_dim"], a["depth"]) == tuple(arch.values())]
        what = f"a {match[0]} checkpoint" if match else "of an unknown architecture"
        raise UADError(
            f"{path}: checkpoint is {what} (width {arch['embed_dim']}, {arch['depth']} blocks), "
            f"not {model_type}; pass the matching --model-type"
        )
    sam = _build_sam(
        encoder_embed_dim=want["embed_dim"],
        encoder_depth=want["depth"],
        encoder_num_heads=want["num_heads"],
        encoder_global_attn_indexes=list(want["global_attn_indexes"]),
    )
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UADError(f"{path}: weights do not match {model_type} ({str(e).splitlines()[0]})") from None
    return sam.eval().requires_grad_(False).to(device)


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UADError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def sam_input(x: torch.Tensor, sam) -> torch.Tensor:
    """SAM's preprocessing, differentiable: the one place it happens.

    Matches SamPredictor.set_image: resize the longest side to the encoder's input size with
    antialiased bilinear interpolation (what PIL does there), normalise by the model's pixel
    mean and std, pad bottom and right with zeros. SamPredictor also rounds the resized image to
    uint8; skipping that keeps the gradient and moves values by at most half a grey level.

    Args:
      x: (B, C, H, W) float in [0, 1], C = 3 (RGB) or 1 (grey, replicated to RGB).

    Returns:
      (B, 3, S, S) float, S = sam.image_encoder.img_size.
    """
    size = sam.image_encoder.img_size
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)  # ResizeLongestSide.get_preprocess_shape
    x = x.expand(-1, 3, -1, -1) * 255
    if (nh, nw) != (h, w):
        x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = (x - sam.pixel_mean) / sam.pixel_std
    return F.pad(x, (0, size - nw, 0, size - nh))


def encoder_features(sam, x: torch.Tensor, layers: Sequence[int], dtype: str = "float32"):
    """Outputs of the encoder blocks `layers` for images x (B, C, H, W) in [0, 1].

    Runs patch_embed, pos_embed and blocks[0 : max(layers) + 1] only: the later blocks and the
    neck do not influence the features and are never run. Returns a list of (B, 64, 64, width).
    """
    enc = sam.image_encoder
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        h = enc.patch_embed(sam_input(x, sam))  # (B, 64, 64, width)
        if enc.pos_embed is not None:
            h = h + enc.pos_embed
        feats = []
        for i, block in enumerate(enc.blocks[: max(layers) + 1]):
            h = block(h)
            if i in layers:
                feats.append(h.float())
    return feats


def feature_distance(fa: List[torch.Tensor], fb: List[torch.Tensor]) -> torch.Tensor:
    """d = 1 - cosine similarity of each image's flattened features, averaged over layers: (B,)."""
    d = [1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1) for a, b in zip(fa, fb)]
    return torch.stack(d).mean(0)


# -----------------------------------------------------------------------------------------------
# Image files: reading any PIL format, writing atomically


@dataclass
class Picture:
    """A decoded image file: the pixels we attack and what we carry through untouched."""

    pixels: np.ndarray  # (H, W, 3) RGB or (H, W) grey, uint8
    alpha: Optional[np.ndarray] = None  # (H, W) uint8, or None

    def to_pil(self, pixels: Optional[np.ndarray] = None) -> Image.Image:
        p = self.pixels if pixels is None else pixels
        if self.alpha is None:
            return Image.fromarray(p)
        return Image.fromarray(np.dstack([p, self.alpha]), "LA" if p.ndim == 2 else "RGBA")


GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def read_image(path) -> Picture:
    """Reads an image file into 8-bit RGB or grey pixels plus an optional alpha channel.

    EXIF orientation is applied; palette, CMYK and other colour modes become RGB; 16-bit and
    float grey images are scaled to 8 bits. Any problem raises UADError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise UADError(f"{path}: is a folder, expected an image file")
    if not path.exists():
        raise UADError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UADError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except Image.UnidentifiedImageError:
        raise UADError(f"{path}: not an image file that PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UADError(f"{path}: truncated or corrupt image ({e})") from None
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    alpha = None
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        alpha = np.asarray(im.getchannel("A"))
    if im.mode in GREY_MODES:
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float64)
            top = 1.0 if im.mode == "F" and a.max() <= 1.0 else 65535.0 if a.max() > 255 else 255.0
            pixels = np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8)
        else:
            pixels = np.asarray(im.convert("L"))
    else:
        pixels = np.asarray(im.convert("RGB"))
    if min(pixels.shape[:2]) < 16:
        raise UADError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, at least 16x16 needed")
    return Picture(np.ascontiguousarray(pixels), alpha)


def output_format(path) -> str:
    """PIL format name for a file name's extension; PNG when it has none."""
    path = Path(path)
    if not path.suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UADError(f"{path}: cannot write images with extension {path.suffix!r}")
    return fmt


def write_image(path, image: Image.Image, overwrite: bool = False) -> None:
    """Saves `image` to `path` atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    fmt = output_format(path)
    if path.exists() and not overwrite:
        raise UADError(f"{path}: exists; pass --overwrite to replace it")
    if path.is_dir():
        raise UADError(f"{path}: is a folder")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UADError(f"{path}: folder {folder} does not exist")
    if fmt == "JPEG" and image.mode in ("RGBA", "LA"):
        raise UADError(f"{path}: JPEG cannot store the alpha channel; save as .png")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UADError(f"{path}: cannot write to {folder} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        os.replace(tmp, path)
    except OSError as e:
        raise UADError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_tensor(pixels: np.ndarray, device="cpu") -> torch.Tensor:
    """(H, W, 3) or (H, W) uint8 -> (1, C, H, W) float in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    t = t[..., None] if t.ndim == 2 else t
    return t.permute(2, 0, 1)[None].float() / 255


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) float on the uint8 lattice -> (H, W, C) or (H, W) uint8."""
    a = (x[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return a[..., 0] if a.shape[-1] == 1 else a
