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
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import warp_kernel

# -----------------------------------------------------------------------------------------------
# Configuration


def knob(default, help: str, unit: float = 1.0):
    """A config field with its CLI help; `unit` is the CLI's unit (255: flags count 1/255ths)."""
    return field(default=default, metadata={"help": help, "unit": unit})


@dataclass
class UADConfig:
    # budget and stage 2 (feature simulation); images are in [0, 1]
    eps: float = knob(8 / 255, "L-infinity budget", unit=255)
    alpha: float = knob(2 / 255, "PGD step size", unit=255)
    steps: int = knob(40, "PGD steps of stage 2")
    random_start: bool = knob(False, "start stage 2 from uniform noise in [-eps, eps]")
    momentum: float = knob(0.0, "MI-FGSM decay mu; 0 disables it (the reference's MI uses 1)")
    input_noise: float = knob(0.0, "DI: std of Gaussian noise on the encoder input", unit=255)
    layers: Sequence[int] = knob((3, 4, 5, 6), "0-based encoder blocks giving the features")
    # stage 1 (deformation)
    deform_steps: int = knob(40, "Adam steps on the flow fields")
    deform_lr: float = knob(10.0, "Adam learning rate, pixels at SAM's 1024 input scale")
    num_flows: int = knob(4, "flow fields tiled into one mosaic flow (K)")
    control_points: int = knob(6, "each flow is a bicubic grid of this many points a side")
    init_std: float = knob(0.1, "initial displacement std, in control-grid blocks")
    cell_size: float = knob(300.0, "side of a mosaic cell, pixels at the 1024 scale")
    lambda_c: float = knob(0.05, "weight of the flow regulariser L_C")
    lambda_tv: float = knob(20.0, "lambda_1: total variation of the flow (locally smooth)")
    lambda_var: float = knob(20.0, "lambda_2: variance of the flow (globally near-uniform)")
    lambda_f: float = knob(1.0, "weight of the fidelity term L_F; 0 turns it off")
    proxy_steps: int = knob(4, "T_f: proxy PGD steps per deformation step; 0 turns them off")
    padding: str = knob("border", "warp sampling outside the image: border | reflection")
    # execution
    seed: int = knob(0, "seed of every random draw (flow init, random start, DI noise)")
    dtype: str = knob("float32", "encoder autocast dtype: float32 | bfloat16")
    impl: str = knob("auto", "warp_kernel backend: auto | cuda | cpp | torch")


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
                    print(
                        f"\rdownloading {url}: {done / 2**20:.0f} MiB{of}", end="", file=sys.stderr
                    )
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
        match = [
            t for t, a in SAM_ARCHS.items() if (a["embed_dim"], a["depth"]) == tuple(arch.values())
        ]
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
        raise UADError(
            f"{path}: weights do not match {model_type} ({str(e).splitlines()[0]})"
        ) from None
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
    mean and std, pad bottom and right with zeros. The resized image is rounded to integers as
    SamPredictor's uint8 one is, with a straight-through gradient.

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
        # SamPredictor's resized image is uint8: round in the forward pass, identity backward
        x = x + (x.round().clamp(0, 255) - x).detach()
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
        raise UADError(
            f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, at least 16x16 needed"
        )
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


def check_destination(path, overwrite: bool = False) -> str:
    """Checks that `path` can be written; returns its PIL format. Raises UADError if not."""
    path = Path(path)
    fmt = output_format(path)
    if path.is_dir():
        raise UADError(f"{path}: is a folder")
    if path.exists() and not overwrite:
        raise UADError(f"{path}: exists; pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise UADError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UADError(f"{path}: cannot write to folder {folder}")
    return fmt


def write_image(path, image: Image.Image, overwrite: bool = False) -> None:
    """Saves `image` to `path` atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    fmt = check_destination(path, overwrite)
    if fmt == "JPEG" and image.mode in ("RGBA", "LA"):
        raise UADError(f"{path}: JPEG cannot store the alpha channel; save as .png")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UADError(f"{path}: cannot write to folder {path.parent} ({e.strerror})") from None
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
    t = torch.from_numpy(np.array(pixels)).to(device)  # a copy: PIL arrays are read-only
    t = t[..., None] if t.ndim == 2 else t
    return t.permute(2, 0, 1)[None].float() / 255


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) float on the uint8 lattice -> (H, W, C) or (H, W) uint8."""
    a = (x[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


# -----------------------------------------------------------------------------------------------
# The attack


class Progress:
    """One status line on stderr: stage, step/total, loss and ETA (redrawn in place on a tty)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet, self.stream = quiet, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.stage, self.start, self.shown = None, 0.0, -1

    def __call__(self, stage: str, step: int, total: int, loss: float) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.start, self.shown = stage, now, -1
        eta = (now - self.start) / step * (total - step) if step else float("nan")
        line = f"{stage} {step}/{total} loss {loss:+.4f} eta {eta:.0f}s"
        if self.tty:
            print(f"\r{line:<60}", end="\n" if step == total else "", file=self.stream, flush=True)
        elif step == total or step * 10 // total > self.shown:  # every 10% in a log file
            self.shown = step * 10 // total
            print(line, file=self.stream, flush=True)


@dataclass
class Stats:
    """What one protect() call did: encoder passes (per batch) and the losses it ended at."""

    forwards: int = 0
    backwards: int = 0
    target_ssim: List[float] = field(default_factory=list)  # SSIM(target, image) per image
    feature_distance: List[float] = field(default_factory=list)  # d(f(adv), f(image)) per image
    seconds: float = 0.0


class Surrogate:
    """The encoder features f(x) of one SAM, counting the passes that reach it."""

    def __init__(self, sam, config: UADConfig, stats: Stats):
        self.sam, self.config, self.stats = sam, config, stats

    def __call__(self, x: torch.Tensor, backward_passes: int = 0) -> List[torch.Tensor]:
        self.stats.forwards += 1
        self.stats.backwards += backward_passes
        return encoder_features(self.sam, x, self.config.layers, self.config.dtype)


def project(x: torch.Tensor, image: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point to x inside the eps-ball around image and inside [0, 1]."""
    return torch.min(torch.max(x, image - eps), image + eps).clamp(0, 1)


def pgd_step(x, grad, image, config: UADConfig, momentum: Optional[torch.Tensor]):
    """One signed descent step of size alpha (MI-FGSM when config.momentum > 0), projected."""
    if config.momentum > 0:
        # MI-FGSM: accumulate the L1-normalised gradient of each image
        norm = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        momentum.mul_(config.momentum).add_(grad / norm)
        grad = momentum
    return project(x - config.alpha * grad.sign(), image, config.eps)


def with_noise(x: torch.Tensor, config: UADConfig, gen: torch.Generator) -> torch.Tensor:
    """DI: the encoder sees x plus Gaussian noise; the perturbation itself stays noise-free."""
    if config.input_noise <= 0:
        return x
    return x + config.input_noise * torch.randn(x.shape, generator=gen).to(x.device)


def mosaic_cells(h: int, w: int, config: UADConfig, device) -> torch.Tensor:
    """One-hot (1, K, 1, H, W) map of which flow field owns each pixel.

    Square cells of cell_size (at SAM's 1024 scale) tile the image; cell (row i, column j) takes
    flow (j + s * i) mod K with s = max(1, K // 2), so that neighbouring cells use different
    flows (a checkerboard for K = 2, a 2 x 2 pattern shifted by two per row for K = 4).
    """
    k = config.num_flows
    cell = max(1, round(config.cell_size * max(h, w) / 1024))
    rows = torch.arange(h, device=device) // cell
    cols = torch.arange(w, device=device) // cell
    owner = (cols[None, :] + max(1, k // 2) * rows[:, None]) % k  # (H, W)
    return F.one_hot(owner, k).permute(2, 0, 1)[None, :, None].float()


def dense_flows(ctrl: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Control grids (B, K, 2, P, P) -> dense flows (B, K, 2, H, W), bicubic, same units."""
    b, k = ctrl.shape[:2]
    dense = F.interpolate(ctrl.flatten(0, 1), (h, w), mode="bicubic", align_corners=True)
    return dense.view(b, k, 2, h, w)


def flow_regulariser(dense: torch.Tensor, config: UADConfig, h: int, w: int) -> torch.Tensor:
    """L_C = lambda_1 TV(w) + lambda_2 var(w) of each flow field, averaged over fields: (B,).

    dense (B, K, 2, H, W) is in pixels at the 1024 scale; measuring it in control-grid blocks
    (and TV per block of distance) makes L_C independent of the image's resolution.
    """
    block = 1024 / config.control_points
    u = dense / block
    per_block = max(h, w) / config.control_points  # image pixels per block
    tv = (u[..., 1:, :] - u[..., :-1, :]).abs().mean((-3, -2, -1))
    tv = (tv + (u[..., 1:] - u[..., :-1]).abs().mean((-3, -2, -1))) * per_block
    var = u.flatten(3).var(-1).sum(-1)  # (B, K): variance of x plus variance of y
    return (config.lambda_tv * tv + config.lambda_var * var).mean(1)


def deform(image, f_image, surrogate: Surrogate, config: UADConfig, gen, progress):
    """Stage 1: the target I_hat = warp(I, flow) minimising SSIM + lambda_C L_C + lambda_F L_F.

    Args:
      image: (B, C, H, W) in [0, 1].
      f_image: the surrogate's features of `image`.

    Returns:
      (target (B, C, H, W) in [0, 1], SSIM(target, image) (B,)), both detached.
    """
    b, _, h, w = image.shape
    block = 1024 / config.control_points
    scale = max(h, w) / 1024  # pixels at the 1024 scale -> image pixels
    ctrl = (
        config.init_std
        * block
        * torch.randn(
            b, config.num_flows, 2, config.control_points, config.control_points, generator=gen
        )
    )
    ctrl = ctrl.to(image.device).requires_grad_(True)  # (B, K, 2, P, P), 1024-scale pixels
    cells = mosaic_cells(h, w, config, image.device)  # (1, K, 1, H, W)
    optimizer = torch.optim.Adam([ctrl], lr=config.deform_lr)
    fidelity = config.lambda_f > 0 and config.proxy_steps > 0
    proxy = image.clone()  # I + r': warm-started across deformation steps
    momentum = torch.zeros_like(image)

    for step in range(config.deform_steps):
        dense = dense_flows(ctrl, h, w)  # (B, K, 2, H, W)
        flow = (dense * cells).sum(1) * scale  # (B, 2, H, W) in image pixels
        ssim, target = warp_kernel.warp_ssim(image, flow, image, config.padding, impl=config.impl)
        loss = ssim + config.lambda_c * flow_regulariser(dense, config, h, w)
        if fidelity:
            # L_F = d(f(I + r'), f(I_hat)) reaches the flow through the target's features; the
            # same backward pass gives the proxy its stage 2 gradient: the first of T_f steps.
            proxy.requires_grad_(True)
            f_target = surrogate(target, backward_passes=1)
            f_proxy = surrogate(with_noise(proxy, config, gen), backward_passes=1)
            loss = loss + config.lambda_f * feature_distance(
                [f.detach() for f in f_proxy], f_target
            )
            f_target = [f.detach() for f in f_target]
            proxy_loss = feature_distance(f_proxy, f_target) - feature_distance(f_proxy, f_image)
            optimizer.zero_grad()
            (loss.sum() + proxy_loss.sum()).backward()  # the two terms share no parameter
            proxy = pgd_step(proxy.detach(), proxy.grad, image, config, momentum)
            for _ in range(config.proxy_steps - 1):
                proxy, _ = refine(proxy, image, f_target, f_image, surrogate, config, gen, momentum)
        else:
            optimizer.zero_grad()
            loss.sum().backward()
        optimizer.step()
        if progress:
            progress("deform", step + 1, config.deform_steps, loss.mean().item())

    with torch.no_grad():
        flow = (dense_flows(ctrl, h, w) * cells).sum(1) * scale
        ssim, target = warp_kernel.warp_ssim(image, flow, image, config.padding, impl=config.impl)
    return target, ssim


def refine(x, image, f_target, f_image, surrogate, config, gen, momentum):
    """One PGD step on d(f(x), f(target)) - d(f(x), f(image)): the stage 2 objective."""
    x = x.detach().requires_grad_(True)
    f_x = surrogate(with_noise(x, config, gen), backward_passes=1)
    loss = feature_distance(f_x, f_target) - feature_distance(f_x, f_image)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return pgd_step(x.detach(), grad, image, config, momentum), loss.detach()


def simulate(image, f_target, f_image, surrogate: Surrogate, config: UADConfig, gen, progress):
    """Stage 2: L-infinity PGD from image towards the target's features. Returns (B, C, H, W)."""
    x = image.clone()
    if config.random_start:
        noise = torch.empty(image.shape).uniform_(-config.eps, config.eps, generator=gen)
        x = project(image + noise.to(image.device), image, config.eps)
    momentum = torch.zeros_like(image)
    for step in range(config.steps):
        x, loss = refine(x, image, f_target, f_image, surrogate, config, gen, momentum)
        if progress:
            progress("simulate", step + 1, config.steps, loss.mean().item())
    return x


def quantize(adv: torch.Tensor, image: torch.Tensor, eps: float) -> torch.Tensor:
    """Rounds adv onto the uint8 lattice inside the budget.

    For an image on the lattice (k / 255), every pixel of the result is within
    floor(eps * 255) grey levels of it, so max |result - image| <= eps holds exactly.
    """
    k = math.floor(eps * 255 + 1e-6)
    a, i = (adv * 255).round(), (image * 255).round()
    return torch.min(torch.max(a, i - k), i + k).clamp(0, 255) / 255


def attack(image: torch.Tensor, sam, config: UADConfig, progress=None) -> tuple:
    """Both stages on a batch. image (B, C, H, W) in [0, 1] -> (adv, target, Stats), detached."""
    depth = len(sam.image_encoder.blocks)
    if not config.layers or min(config.layers) < 0 or max(config.layers) >= depth:
        raise UADError(f"layers {tuple(config.layers)}: the surrogate has blocks 0..{depth - 1}")
    stats, start = Stats(), time.monotonic()
    surrogate = Surrogate(sam, config, stats)
    gen = torch.Generator().manual_seed(config.seed)  # CPU draws: the same on every device
    with torch.no_grad():
        f_image = surrogate(image)
    target, target_ssim = deform(image, f_image, surrogate, config, gen, progress)
    with torch.no_grad():
        f_target = surrogate(target)
    adv = simulate(image, f_target, f_image, surrogate, config, gen, progress)
    with torch.no_grad():
        distance = feature_distance(surrogate(adv), f_image)
    stats.forwards -= 1  # the final measurement is not part of the attack
    stats.target_ssim, stats.feature_distance = target_ssim.tolist(), distance.tolist()
    stats.seconds = time.monotonic() - start
    return adv, target, stats


def protect(image, sam=None, *, config: Optional[UADConfig] = None, progress=None, stats=None):
    """Protects an image against promptable segmentation with UAD.

    Args:
      image: one of
        - torch.Tensor (B, C, H, W) float in [0, 1], C = 3 (RGB) or 1 (grey), on any device;
        - np.ndarray (H, W, 3) or (H, W) uint8;
        - PIL.Image.Image (any mode; an alpha channel is carried through untouched).
      sam: the surrogate, a segment_anything Sam; None loads the official ViT-B (downloading it
        on first use) onto CUDA when available.
      config: attack settings; None is the `paper` preset.
      progress: callable(stage, step, total, loss), e.g. Progress(); None is silent.
      stats: a Stats to fill with what the attack did.

    Returns:
      The protected image, of the same kind as `image`: a float tensor within eps of the input;
      or uint8 pixels / a PIL image rounded onto the uint8 lattice, exactly within eps.
    """
    config = config or UADConfig()
    sam = sam if sam is not None else load_sam("vit_b", None, resolve_device("auto"))
    device = sam.pixel_mean.device
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[1] not in (1, 3) or not image.is_floating_point():
            raise UADError(f"expected a float (B, 1 or 3, H, W) tensor, got {tuple(image.shape)}")
        adv, _, s = attack(image.to(device, torch.float32), sam, config, progress)
        result = adv.to(image.device, image.dtype)
    elif isinstance(image, (np.ndarray, Image.Image)):
        picture = to_picture(image)
        x = to_tensor(picture.pixels, device)
        adv, _, s = attack(x, sam, config, progress)
        pixels = to_pixels(quantize(adv, x, config.eps))
        result = picture.to_pil(pixels) if isinstance(image, Image.Image) else pixels
    else:
        raise UADError(
            f"cannot protect a {type(image).__name__}; pass a tensor, array or PIL image"
        )
    if stats is not None:
        vars(stats).update(vars(s))
    return result


def to_picture(image) -> Picture:
    """A uint8 array or PIL image as a Picture (RGB or grey pixels plus optional alpha)."""
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        alpha = np.asarray(image.getchannel("A")) if image.mode in ("RGBA", "LA") else None
        grey = image.mode in GREY_MODES
        return Picture(np.asarray(image.convert("L" if grey else "RGB")), alpha)
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))
    ):
        raise UADError(
            f"expected a uint8 (H, W, 3) or (H, W) array, got {image.dtype} {image.shape}"
        )
    return Picture(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)


# -----------------------------------------------------------------------------------------------
# Command line


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two [0, 1] images, in dB (inf when identical)."""
    mse = (a - b).double().pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def jobs_for(src: Path, dst: Path) -> list:
    """(input, output) pairs: one file, or every image file of a folder into another folder."""
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise UADError(f"{dst}: input is a folder, so the output must be a folder too")
        exts = Image.registered_extensions()
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise UADError(f"{src}: no image files in this folder")
        return [(p, dst / p.name) for p in files]
    if dst.is_dir():
        dst = dst / src.name
    return [(src, dst)]


def check_job(src: Path, dst: Path, overwrite: bool) -> str:
    """Checks one (input, output) pair before any work; returns the output's PIL format."""
    if dst.resolve() == src.resolve() and not overwrite:
        raise UADError(f"{dst}: output is the input file; pass --overwrite to replace it")
    return check_destination(dst, overwrite)


def protect_file(src: Path, dst: Path, sam, config: UADConfig, args) -> str:
    """Protects one file; returns its summary line. Raises UADError on bad input."""
    fmt = check_job(src, dst, args.overwrite)
    picture = read_image(src)
    device = sam.pixel_mean.device
    x = to_tensor(picture.pixels, device)
    adv, _, stats = attack(x, sam, config, Progress(quiet=args.quiet))
    protected = picture.to_pil(to_pixels(quantize(adv, x, config.eps)))
    if fmt == "JPEG" and not args.quiet:
        print(
            f"warning: {dst}: JPEG compression weakens the perturbation; "
            "the figures below are of the decoded JPEG",
            file=sys.stderr,
        )
    write_image(dst, protected, overwrite=args.overwrite)
    saved = to_tensor(read_image(dst).pixels, device)  # measure the file as saved
    with torch.no_grad():
        f_image = encoder_features(sam, x, config.layers, config.dtype)
        distance = feature_distance(
            encoder_features(sam, saved, config.layers, config.dtype), f_image
        )
    linf = round((saved - x).abs().max().item() * 255)
    ssim = warp_kernel.ssim(saved.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)).item()
    return (
        f"{dst}: L-inf {linf}/255, PSNR {psnr(saved, x):.2f} dB, SSIM {ssim:.4f}, "
        f"feature distance {distance.item():.4f}, {stats.seconds:.1f} s ({args.preset} preset)"
    )


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other input error
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="uad.py", description="Protect images against Segment Anything with UAD.")
    p.add_argument("input", type=Path, help="image file, or a folder of images")
    p.add_argument("output", type=Path, help="output file (format from its extension), or folder")
    p.add_argument(
        "--preset",
        default="paper",
        choices=list(PRESETS),
        help="paper (default): live fidelity term; reference: what the authors' code "
        "effectively computes (no fidelity term, no proxy loop)",
    )
    p.add_argument(
        "--model-type",
        default="vit_b",
        metavar="TYPE",
        help="surrogate SAM: vit_b (default) | vit_l | vit_h",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="SAM weights (.pth); default: the official file in $UNSEGMENT_CACHE "
        "(~/.cache/unsegment), downloaded on first use",
    )
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no header or progress lines")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group = p.add_argument_group("attack settings (defaults are the paper preset's)")
    for f in dataclasses.fields(UADConfig):
        flag = "--" + f.name.replace("_", "-")
        unit, default = f.metadata["unit"], f.default
        shown = (
            f"{default * unit:g}/255"
            if unit == 255
            else ",".join(map(str, default))
            if f.name == "layers"
            else default
        )
        helptext = f"{f.metadata['help']}" + ("" if f.type is bool else f" [{shown}]")
        if f.type is bool:
            group.add_argument(flag, action="store_true", default=None, help=helptext)
        elif f.name == "layers":
            group.add_argument(
                flag,
                type=lambda s: tuple(int(v) for v in s.split(",")),
                default=None,
                metavar="I,J,..",
                help=helptext,
            )
        else:
            metavar = "N" if type(default) is int else "X" if type(default) is float else "NAME"
            group.add_argument(
                flag, type=type(default), default=None, metavar=metavar, help=helptext
            )
    return p


def config_from_args(args) -> UADConfig:
    overrides = {}
    for f in dataclasses.fields(UADConfig):
        value = getattr(args, f.name)
        if value is not None:
            overrides[f.name] = value / f.metadata["unit"] if f.metadata["unit"] != 1 else value
    config = preset_config(args.preset, **overrides)
    eps255 = config.eps * 255
    if not 0 < eps255 <= 64:
        raise UADError(f"--eps {eps255:g}: must be in (0, 64] (units of 1/255)")
    if config.alpha <= 0 or config.steps < 0 or config.deform_steps < 0:
        raise UADError("--alpha must be positive, --steps and --deform-steps non-negative")
    if config.dtype not in ("float32", "bfloat16"):
        raise UADError(f"--dtype {config.dtype}: choose float32 or bfloat16")
    if config.padding not in ("border", "reflection"):
        raise UADError(f"--padding {config.padding}: choose border or reflection")
    if config.num_flows < 1 or config.control_points < 2:
        raise UADError("--num-flows must be at least 1 and --control-points at least 2")
    return config


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        jobs = jobs_for(args.input, args.output)
        if len(jobs) == 1:  # a bad input or output fails before any model is loaded
            read_image(jobs[0][0])
            check_job(*jobs[0], args.overwrite)
        elif not args.output.exists():
            args.output.mkdir(parents=True)
        device = resolve_device(args.device)
        if not args.quiet:
            print(
                f"unsegment: preset {args.preset}, eps {config.eps * 255:g}/255 "
                f"({config.eps:.4f}), {config.deform_steps} deformation + {config.steps} PGD "
                f"steps, surrogate {args.model_type} on {device}, seed {config.seed}",
                file=sys.stderr,
            )
        sam = load_sam(args.model_type, args.checkpoint, device, quiet=args.quiet)
    except UADError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failures = 0
    for src, dst in jobs:
        try:
            print(protect_file(src, dst, sam, config, args), flush=True)
        except UADError as e:
            failures += 1
            print(f"error: {e}", file=sys.stderr)
    if len(jobs) > 1:
        print(f"{len(jobs) - failures} protected, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
