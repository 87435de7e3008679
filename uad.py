"""UAD: Unsegment Anything by Simulating Deformation (Lu, Yang, Wang, CVPR 2024).

Adds an imperceptible L-infinity perturbation to an image so that the Segment Anything family
fails to segment it, for any point or box prompt:

    python uad.py in.png out.png --eps 8

Stage 1 (deformation) optimises a flow field whose warp of the image is a structurally different
but natural-looking target whose encoder features stay reachable inside the budget. Stage 2
(feature simulation) runs L-infinity PGD pulling the image's encoder features towards the target's
and away from its own. As a library: `protect(image, sam, config=UADConfig())`.

Layout: configuration; SAM's preprocessing and features; stage 1; stage 2; `attack` and
`protect`; then the plumbing (checkpoints, image files, progress) and the command line.
"""

import argparse
import dataclasses
import functools
import hashlib
import importlib
import io
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
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import warp_kernel


class UADError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# -----------------------------------------------------------------------------------------------
# Configuration


def knob(
    default, help: str, unit: float = 1.0, choices=None, at_least=None, above=None, at_most=None
):
    """A config field with its CLI help and the values it admits (checked by UADConfig).

    unit: the CLI's unit (255: the flag counts 1/255ths); choices: the allowed values;
    at_least / above: an inclusive / exclusive lower bound; at_most: an upper bound.
    """
    meta = dict(
        help=help, unit=unit, choices=choices, at_least=at_least, above=above, at_most=at_most
    )
    return field(default=default, metadata=meta)


# How a SAM v1 ViT block's attention is computed; every choice gives the same features (within
# float32 rounding) from the same weights. "sam": segment_anything's own Attention, which builds
# the (tokens x tokens) attention matrix per head and adds the decomposed relative positions to
# it. "sdpa": torch's fused scaled_dot_product_attention (flash kernels on CPU and CUDA, no
# tokens x tokens tensor), the relative positions carried as extra query and key channels.
# "sdpa-mask": the same call with the relative positions as an additive attention mask, which
# is materialised (on CUDA the memory-efficient kernel differentiates it; on a CPU torch falls
# back to its unfused attention when the mask needs a gradient).
ATTENTIONS = ("sam", "sdpa", "sdpa-mask")


@dataclass
class UADConfig:
    method: str = knob(
        "uad",
        "uad: both stages; aa: stage 2 towards another image's features; noise: uniform noise",
        choices=("uad", "aa", "noise"),
    )
    # budget and stage 2 (feature simulation); images are in [0, 1]
    eps: float = knob(8 / 255, "L-infinity budget, 1 to 64", unit=255, above=0)
    alpha: float = knob(2 / 255, "PGD step size", unit=255, above=0)
    steps: int = knob(40, "PGD steps of stage 2", at_least=0)
    random_start: bool = knob(False, "start stage 2 from uniform noise in [-eps, eps]")
    momentum: float = knob(
        0.0, "MI-FGSM decay mu; 0 disables it (the reference's MI: 1)", at_least=0
    )
    encoder_noise: float = knob(
        0.0, "std of Gaussian noise on what the encoder sees (never on the output)", 255, at_least=0
    )
    robust: str = knob(
        "", "publishing the encoder sees at each PGD step, e.g. jpeg:50-95,resize:0.5-1,none"
    )
    layers: Sequence[int] = knob(
        (3, 4, 5, 6), "ViT surrogates (SAM v1): 0-based encoder blocks giving the features"
    )
    stage_layers: Sequence[int] = knob(
        (0, 1, 2, 3),
        "hierarchical surrogates (SAM 2's Hiera, MobileSAM's TinyViT): blocks giving the "
        "features, counted from the first of the third stage (stride 16)",
    )
    # stage 1 (deformation)
    deform_steps: int = knob(40, "Adam steps on the flow fields", at_least=0)
    deform_lr: float = knob(10.0, "Adam learning rate, pixels at SAM's 1024 input scale", above=0)
    num_flows: int = knob(4, "flow fields tiled into one mosaic flow (K)", at_least=1, at_most=16)
    control_points: int = knob(
        6, "each flow is a bicubic grid of P x P points", at_least=2, at_most=256
    )
    init_std: float = knob(0.1, "initial displacement std, in control-grid blocks", at_least=0)
    cell_size: float = knob(300.0, "side of a mosaic cell, pixels at the 1024 scale", above=0)
    lambda_c: float = knob(0.05, "weight of the flow regulariser L_C", at_least=0)
    lambda_tv: float = knob(
        20.0, "lambda_1: total variation of the flow (local smoothness)", at_least=0
    )
    lambda_var: float = knob(20.0, "lambda_2: variance of the flow (near-uniformity)", at_least=0)
    lambda_f: float = knob(1.0, "weight of the fidelity term L_F; 0 turns it off", at_least=0)
    proxy_steps: int = knob(4, "T_f: proxy PGD steps per deformation step; 0: none", at_least=0)
    join_passes: str = knob(
        "auto",
        "run the target's and the proxy's encoder passes of a deformation step as one batch: "
        "auto (on CUDA), yes, no",
        choices=("auto", "yes", "no"),
    )
    padding: str = knob(
        "border", "warp sampling outside the image", choices=tuple(warp_kernel.PADDINGS)
    )
    # execution
    seed: int = knob(
        0,
        "seed of every random draw (flow init, random start, encoder noise, robust), per image",
        at_least=0,
    )
    dtype: str = knob("float32", "encoder autocast dtype", choices=("float32", "bfloat16"))
    attention: str = knob(
        "sam",
        "encoder attention: sam (segment_anything's), sdpa (fused kernels), sdpa-mask",
        choices=ATTENTIONS,
    )
    compile: bool = knob(False, "run the encoder through torch.compile (compiles on first use)")
    impl: str = knob("auto", "warp_kernel backend", choices=warp_kernel.IMPLS)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] is not None and value not in meta["choices"]:
                raise UADError(f"{f.name} {value!r}: choose from {', '.join(meta['choices'])}")
            if meta["at_least"] is not None and not value >= meta["at_least"]:
                raise UADError(f"{f.name} {value!r}: must be at least {meta['at_least']}")
            if meta["above"] is not None and not value > meta["above"]:
                raise UADError(f"{f.name} {value!r}: must be above {meta['above']}")
            if meta["at_most"] is not None and not value <= meta["at_most"]:
                raise UADError(f"{f.name} {value!r}: must be at most {meta['at_most']}")
        parse_robust(self.robust)
        for name in ("layers", "stage_layers"):
            blocks = getattr(self, name)
            if not blocks or min(blocks) < 0:
                raise UADError(
                    f"{name} {','.join(map(str, blocks))}: need one or more block indices >= 0"
                )


# `paper` optimises the deformation with the live fidelity term, as the paper states.
# `no-fidelity` is the same deformation with L_F off: no proxy loop, 42 encoder passes per
# image instead of 242. `reference` is its old name: the authors' code gets no fidelity gradient
# into the warp either, but it differs from this preset in its losses and warps (see README).
# The baselines: `aa`, the paper's strongest ("AA": stage 2's PGD towards the features of
# another image, with no deformation and no push away from the image's own features), and
# `noise`, uniform random noise in [-eps, eps].
PRESETS = {
    "paper": {},
    "no-fidelity": {"lambda_f": 0.0, "proxy_steps": 0},
    "aa": {"method": "aa"},  # baseline: feature attack towards a given other image
    "noise": {"method": "noise"},  # baseline: what the budget alone does
}
PRESET_ALIASES = {"reference": "no-fidelity"}


def preset_config(name: str, **overrides) -> UADConfig:
    """Builds the config of preset `name` (see PRESETS), with fields overridden."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise UADError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return UADConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------------------------
# Segment Anything: preprocessing and encoder features. A surrogate is a model of the family
# whose encoder features f the attack moves; a Surrogate class per family below states, in one
# place, what that encoder is fed (its package's own preprocessing, here differentiable and run
# inside the optimisation) and which block outputs form f. Only the blocks up to the deepest of
# those ever run: the later blocks and the neck cannot change f.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM 2, on [0, 1]


def sam_input(x: torch.Tensor, sam) -> torch.Tensor:
    """SAM v1's preprocessing (MobileSAM's too), differentiable: the one place it happens.

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


def sam2_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """SAM 2's preprocessing, differentiable: SAM2Transforms as SAM2ImagePredictor applies it.

    Resizes to a size x size square, not keeping the aspect ratio (bilinear and antialiased, as
    torchvision's Resize does to a tensor), and normalises by ImageNet's mean and std on the
    [0, 1] scale. Nothing is padded or rounded.

    Args:
      x: (B, C, H, W) float in [0, 1], C = 3 (RGB) or 1 (grey, replicated to RGB).
      size: the model's image_size (1024 for every released SAM 2 and 2.1).

    Returns:
      (B, 3, size, size) float.
    """
    x = F.interpolate(
        x.expand(-1, 3, -1, -1), (size, size), mode="bilinear", align_corners=False, antialias=True
    )
    mean, std = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1), x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def encoder_features(
    sam, x: torch.Tensor, layers: Sequence[int], dtype: str = "float32", attention: str = "sam"
):
    """Outputs of the encoder blocks `layers` for images x (B, C, H, W) in [0, 1].

    Runs patch_embed, pos_embed and blocks[0 : max(layers) + 1] only: the later blocks and the
    neck do not influence the features and are never run. attention: see `run_block`. Returns a
    list of (B, 64, 64, width).
    """
    enc = sam.image_encoder
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        h = enc.patch_embed(sam_input(x, sam))  # (B, 64, 64, width)
        if enc.pos_embed is not None:
            h = h + enc.pos_embed
        feats = []
        for i, block in enumerate(enc.blocks[: max(layers) + 1]):
            h = run_block(block, h, attention)
            if i in layers:
                feats.append(h.float())
    return feats


def run_block(block, h: torch.Tensor, attention: str = "sam") -> torch.Tensor:
    """One ViT block of a SAM v1 image encoder (segment_anything's Block) on tokens
    h (B, H, W, width), with its attention computed as `attention` says (see ATTENTIONS)."""
    if attention == "sam":
        return block(h)
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    # Block.forward, with the attention call replaced
    x = block.norm1(h)
    if block.window_size > 0:
        hw = x.shape[1:3]
        x, padded_hw = window_partition(x, block.window_size)  # (B * windows, w, w, width)
    x = fused_attention(block.attn, x, rel_pos_as=attention.partition("-")[2] or "channels")
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, padded_hw, hw)
    h = h + x
    return h + block.mlp(block.norm2(h))


def fused_attention(attn, x: torch.Tensor, rel_pos_as: str = "channels") -> torch.Tensor:
    """segment_anything's Attention(x) through F.scaled_dot_product_attention, same weights.

    SAM adds to the logit of query q and key (i, j) (row i, column j of the key grid) the
    decomposed relative position term rel_h[q, i] + rel_w[q, j], with rel_h = q . R_h and
    rel_w = q . R_w from the block's tables. "channels" makes that term part of the dot product
    itself: q' = [q * scale, rel_h(q), rel_w(q)] and k' = [k, onehot(i), onehot(j)], so that
    q' . k' is SAM's logit exactly and the fused kernels run unchanged (the values are padded
    with zeros to the same width, and the output cropped back). "mask" passes the term as an
    additive attention mask instead.

    Args:
      attn: a segment_anything Attention (qkv, proj, num_heads, scale, rel_pos_h/w).
      x: (B, H, W, width) tokens: one window per batch row for windowed blocks.
      rel_pos_as: "channels" or "mask".

    Returns:
      (B, H, W, width), what attn(x) returns.
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    n = h * w
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    q, k, v = qkv.unbind(0)
    d = q.shape[-1]
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        grid = q.reshape(b, heads, h, w, d)
        # (B, heads, N, H) and (B, heads, N, W): the term of each query for each key row / column
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, get_rel_pos(h, h, attn.rel_pos_h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, get_rel_pos(w, w, attn.rel_pos_w))
        rel_h, rel_w = rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)
        if rel_pos_as == "mask":
            mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        else:
            # key (i, j) is row-major index i * W + j; widths padded to a multiple of 8, which
            # the CUDA kernels need
            pad = -(d + h + w) % 8
            rows = torch.eye(h, dtype=q.dtype, device=q.device).repeat_interleave(w, 0)  # (N, H)
            cols = torch.eye(w, dtype=q.dtype, device=q.device).repeat(h, 1)  # (N, W)
            onehot = F.pad(torch.cat([rows, cols], 1), (0, pad)).expand(b, heads, n, -1)
            q = torch.cat([q * attn.scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], -1)
            q = F.pad(q, (0, pad))  # (B, heads, N, d + H + W + pad)
            k = torch.cat([k, onehot], -1)
            v = F.pad(v, (0, h + w + pad))
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :d]
    out = out.transpose(1, 2).reshape(b, h, w, -1)  # (B, N, heads, d) -> (B, H, W, width)
    return attn.proj(out)


def hiera_features(model, x: torch.Tensor, blocks: Sequence[int], dtype: str = "float32"):
    """Outputs of SAM 2's Hiera trunk blocks `blocks` for images x (B, C, H, W) in [0, 1].

    Runs what Hiera.forward runs before its blocks (patch_embed and the windowed positional
    embedding) and blocks[0 : max(blocks) + 1] only: the later blocks, the FPN neck and the
    mask decoder's high-resolution convolutions are never run. Returns a list of
    (B, S / stride, S / stride, width), S = model.image_size; stride 16 in the third stage.
    """
    trunk = model.image_encoder.trunk
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        h = trunk.patch_embed(sam2_input(x, model.image_size))  # (B, S/4, S/4, width)
        h = h + trunk._get_pos_embed(h.shape[1:3])  # the package's own interpolated table
        feats = []
        for i, block in enumerate(trunk.blocks[: max(blocks) + 1]):
            h = block(h)  # the first block of a stage pools its queries: stride x 2
            if i in blocks:
                feats.append(h.float())
    return feats


def tinyvit_features(sam, x: torch.Tensor, blocks: Sequence[int], dtype: str = "float32"):
    """Outputs of MobileSAM's TinyViT blocks `blocks` (numbered across its four stages) for
    images x (B, C, H, W) in [0, 1].

    Runs patch_embed, then each stage's blocks and, between stages, its patch merging, up to
    block max(blocks) only: the later blocks and the neck are never run. Returns a list of
    (B, width, S/4, S/4) for the first stage's convolution blocks, (B, L, width) tokens after.
    """
    enc, last, i = sam.image_encoder, max(blocks), 0
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        h = enc.patch_embed(sam_input(x, sam))  # (B, 64, S/4, S/4)
        feats = []
        for stage in enc.layers:
            for block in stage.blocks:
                h = block(h)
                if i in blocks:
                    feats.append(h.float())
                if i == last:
                    return feats
                i += 1
            h = stage.downsample(h)  # every stage but the last has one
    return feats


def feature_distance(fa: list, fb: list) -> torch.Tensor:
    """d = 1 - cosine similarity of each image's flattened features, averaged over layers: (B,).

    For an ensemble's features (a list of features per surrogate), the mean over the surrogates
    of each one's d.
    """
    if isinstance(fa[0], list):
        return torch.stack([feature_distance(a, b) for a, b in zip(fa, fb)]).mean(0)
    d = [1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1) for a, b in zip(fa, fb)]
    return torch.stack(d).mean(0)


def each_feature(fn, features: list) -> list:
    """fn applied to every tensor of a surrogate's (or an ensemble's) features, nesting kept."""
    return [each_feature(fn, f) if isinstance(f, list) else fn(f) for f in features]


def simulation_loss(f_x, f_target, f_image) -> torch.Tensor:
    """Stage 2's objective d(f(x), f(target)) - d(f(x), f(image)), to minimise: (B,).
    Without f_image (the `aa` baseline) only d(f(x), f(target))."""
    towards = feature_distance(f_x, f_target)
    return towards if f_image is None else towards - feature_distance(f_x, f_image)


def check_layers(name: str, config: UADConfig, depth: int, third_stage=None, cli=False) -> None:
    """UADError unless the blocks `config` asks of surrogate `name` exist: an encoder of `depth`
    blocks whose third stage starts at block `third_stage` (None: a ViT, which has one stage).
    cli: the error names the command-line flag."""
    field = "layers" if third_stage is None else "stage_layers"
    chosen, have = getattr(config, field), depth - (third_stage or 0)
    if max(chosen) >= have:
        label = f"--{field.replace('_', '-')}" if cli else field
        where = "" if third_stage is None else ", counted from the first of its third stage"
        raise UADError(
            f"{label} {','.join(map(str, chosen))}: {name} has blocks 0..{have - 1}{where}"
        )


class Surrogate:
    """A model of the SAM family as the attack's surrogate: f(x), for images x in [0, 1].

    One subclass per family states its preprocessing and which blocks' outputs form f;
    `Surrogate.of(model)` picks the family from the model's image encoder. Blocks are numbered
    0-based over the whole encoder.

    Args:
      model: the model, in eval mode: a segment_anything (or segment_anything_hq) Sam, a
        mobile_sam Sam, or a sam2 SAM2Base.
      name: how lines and errors name it (default: the family).
    """

    family = ""
    third_stage: Optional[int] = None  # first block of the third stage; None: a ViT

    def __init__(self, model, name: Optional[str] = None):
        self.model, self.name = model, name or self.family

    @staticmethod
    def of(model, name: Optional[str] = None) -> "Surrogate":
        """The Surrogate of `model`'s family (a Surrogate is returned as it is)."""
        if isinstance(model, Surrogate):
            return model
        encoder = getattr(model, "image_encoder", None)
        if hasattr(encoder, "trunk"):
            return HieraSurrogate(model, name)
        if hasattr(encoder, "layers"):
            return TinyViTSurrogate(model, name)
        if hasattr(encoder, "blocks"):
            return ViTSurrogate(model, name)
        raise UADError(
            f"cannot use a {type(model).__name__} as a surrogate: expected a Segment Anything "
            "model (SAM, SAM-HQ, MobileSAM or SAM 2)"
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_size(self) -> int:
        """The side of the square the encoder is fed (its model's own, 1024 when released)."""
        return self.model.image_encoder.img_size

    def blocks(self, config: UADConfig) -> tuple:
        """The 0-based encoder blocks whose outputs form f: config.layers for a ViT,
        config.stage_layers counted from the third stage for a hierarchical encoder."""
        if self.third_stage is None:
            return tuple(config.layers)
        return tuple(self.third_stage + i for i in config.stage_layers)

    def check(self, config: UADConfig) -> None:
        check_layers(self.name, config, self.depth, self.third_stage)

    def features(self, x: torch.Tensor, config: UADConfig) -> List[torch.Tensor]:
        """f(x): the outputs of blocks(config) for images x (B, C, H, W) in [0, 1]."""
        raise NotImplementedError


class ViTSurrogate(Surrogate):
    """SAM v1 (and SAM-HQ, which keeps SAM's encoder): a plain ViT at stride 16. Input:
    sam_input (longest side resized to the encoder's size and padded, 0-255 scale, the
    model's pixel mean and std). f: the outputs of blocks config.layers, by default the paper's
    blocks 4-7 of ViT-B (0-based 3..6), each (B, 64, 64, width)."""

    family = "SAM ViT"

    @property
    def depth(self) -> int:
        return len(self.model.image_encoder.blocks)

    def features(self, x, config):
        features = compiled_encoder_features() if config.compile else encoder_features
        return features(self.model, x, self.blocks(config), config.dtype, config.attention)


class HieraSurrogate(Surrogate):
    """SAM 2 and SAM 2.1: a Hiera trunk of four stages at strides 4, 8, 16 and 32. Input:
    sam2_input (a square resize to image_size, ImageNet mean and std on [0, 1]). f: by default
    the outputs of the first four blocks of the third stage (config.stage_layers), at stride 16.

    Why those: SAM v1's ViT works at stride 16 throughout, and the paper's f is an early-middle
    stretch of it (blocks 4-7 of 12), before the later blocks specialise. Hiera reaches stride
    16 in its third stage, which holds most of its blocks (7 of Hiera-T's 12, 36 of Hiera-L's
    48) and feeds the stride-16 image embedding that SAM 2's mask decoder attends to (the
    strides 4 and 8 reach it only as high-resolution skips). Its first four blocks are the
    early-middle stretch at that stride, four like the paper's, and cheap: Hiera-T runs 7 of
    12 blocks for them, Hiera-L 12 of 48. Which blocks transfer best is not measured here (no
    trained checkpoint can be fetched on this project's machines); --stage-layers chooses
    others.
    """

    family = "SAM 2 Hiera"

    @property
    def input_size(self) -> int:
        return self.model.image_size

    @property
    def third_stage(self) -> int:
        return self.model.image_encoder.trunk.stage_ends[1] + 1

    @property
    def depth(self) -> int:
        return len(self.model.image_encoder.trunk.blocks)

    def features(self, x, config):
        return hiera_features(self.model, x, self.blocks(config), config.dtype)


class TinyViTSurrogate(Surrogate):
    """MobileSAM: a TinyViT of four stages (convolutions at stride 4, attention at strides 8,
    16 and 16: MobileSAM's last patch merging keeps 64 x 64). Input: sam_input, as SAM v1's,
    with MobileSAM's pixel mean and std (SAM's values). f: by default the outputs of the first
    four blocks of the third stage (config.stage_layers; blocks 4..7 of 12), for the reasons
    given for Hiera: the early-middle stretch at stride 16, where most of the attention blocks
    are; 8 of 12 blocks run.
    """

    family = "MobileSAM TinyViT"

    @property
    def third_stage(self) -> int:
        layers = self.model.image_encoder.layers
        return len(layers[0].blocks) + len(layers[1].blocks)

    @property
    def depth(self) -> int:
        return sum(len(stage.blocks) for stage in self.model.image_encoder.layers)

    def features(self, x, config):
        return tinyvit_features(self.model, x, self.blocks(config), config.dtype)


def surrogates_of(sam) -> List[Surrogate]:
    """A model, a Surrogate, or a list of either, as a list of Surrogates on one device."""
    surrogates = [Surrogate.of(m) for m in (sam if isinstance(sam, (list, tuple)) else [sam])]
    if not surrogates:
        raise UADError("no surrogate given")
    devices = {str(s.device) for s in surrogates}
    if len(devices) > 1:
        raise UADError(f"the surrogates are on different devices ({', '.join(sorted(devices))})")
    return surrogates


@dataclass
class Stats:
    """What one attack did: encoder passes (per batch, through each surrogate) and the losses
    it ended at."""

    forwards: int = 0
    backwards: int = 0
    target_ssim: List[float] = field(default_factory=list)  # SSIM(target, image) per image
    feature_distance: List[float] = field(default_factory=list)  # d(f(adv), f(image)) per image
    seconds: float = 0.0


class Ensemble:
    """The surrogates as the attack calls them: f(x) is a list of features per surrogate, and
    feature_distance averages the surrogates' distances. A call is one pass through each
    surrogate's encoder; the passes are counted in stats."""

    def __init__(self, surrogates: List[Surrogate], config: UADConfig, stats: Stats):
        self.surrogates, self.config, self.stats = surrogates, config, stats

    def __call__(self, x: torch.Tensor, backward_passes: int = 0) -> List[List[torch.Tensor]]:
        self.stats.forwards += 1
        self.stats.backwards += backward_passes
        return [s.features(x, self.config) for s in self.surrogates]


COMPILE_BACKEND = "inductor"  # torch.compile's backend for config.compile


@functools.lru_cache(maxsize=None)
def compiled_encoder_features():
    """encoder_features through torch.compile, made once per process: a new input shape, dtype
    or attention compiles again, and fullgraph makes a graph break an error, not a slowdown."""
    return torch.compile(encoder_features, fullgraph=True, backend=COMPILE_BACKEND)


def encoder_passes(config: UADConfig) -> tuple:
    """(forwards, backwards) that `attack` makes per batch with `config` through the encoder of
    each surrogate (an ensemble of n makes them through each of its n encoders)."""
    if config.method == "noise":
        return 1, 0  # f(image), for the distance it reports
    if config.method == "aa":
        return 2 + config.steps, config.steps  # f(image), f(target image), the PGD steps
    per_deform_step = 1 + config.proxy_steps if uses_fidelity(config) else 0
    # f(image), the deformation steps, f(target), then one forward + backward per PGD step
    forwards = 1 + config.deform_steps * per_deform_step + 1 + config.steps
    return forwards, config.deform_steps * per_deform_step + config.steps


# -----------------------------------------------------------------------------------------------
# Stage 1: deformation. The flow lives in three units: control-grid blocks (1024 / P pixels at
# the 1024 scale, for the initial std and the regulariser), pixels at SAM's 1024 input scale
# (the optimised control points, so the learning rate means the same at every resolution), and
# image pixels (what the warp takes). Every name or comment below says which.


def mosaic_cells(h: int, w: int, config: UADConfig, device) -> torch.Tensor:
    """One-hot (1, K, 1, H, W) map of which flow field owns each pixel.

    Square cells of cell_size (at SAM's 1024 scale) tile the image; cell (row i, column j) takes
    flow (j + s * i) mod K with s = max(1, K // 2), so that neighbouring cells use different
    flows (a checkerboard for K = 2, a 2 x 2 pattern shifted by two per row for K = 4).
    """
    k = config.num_flows
    cell = max(1, round(config.cell_size * max(h, w) / 1024))  # image pixels
    rows = torch.arange(h, device=device) // cell
    cols = torch.arange(w, device=device) // cell
    owner = (cols[None, :] + max(1, k // 2) * rows[:, None]) % k  # (H, W)
    return F.one_hot(owner, k).permute(2, 0, 1)[None, :, None].float()


def mosaic_flow(ctrl: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The one flow that warps the image, from K control grids: (B, 2, H, W), same units.

    ctrl (B, K, 2, P, P) is interpolated bicubically to K dense fields (B, K, 2, H, W); each
    pixel then takes the field of its mosaic cell (cells from `mosaic_cells`).
    """
    b, k = ctrl.shape[:2]
    h, w = cells.shape[-2:]
    dense = F.interpolate(ctrl.flatten(0, 1), (h, w), mode="bicubic", align_corners=True)
    return (dense.view(b, k, 2, h, w) * cells).sum(1)


def flow_regulariser(flow: torch.Tensor, config: UADConfig) -> torch.Tensor:
    """L_C = lambda_1 TV(w) + lambda_2 var(w) of the applied flow, cell seams included: (B,).

    flow (B, 2, H, W) is in pixels at the 1024 scale. Measured in control-grid blocks, with TV
    per block of distance, L_C does not depend on the image's resolution. A jump between two
    cells' fields is a large difference between neighbouring pixels, so TV penalises it.
    """
    h, w = flow.shape[-2:]
    u = flow / (1024 / config.control_points)  # (B, 2, H, W) in control-grid blocks
    per_block = max(h, w) / config.control_points  # image pixels per block
    tv = (u[..., 1:, :] - u[..., :-1, :]).abs().mean((-3, -2, -1))
    tv = (tv + (u[..., 1:] - u[..., :-1]).abs().mean((-3, -2, -1))) * per_block
    var = u.flatten(2).var(-1).sum(-1)  # variance of x plus variance of y
    return config.lambda_tv * tv + config.lambda_var * var


def uses_fidelity(config: UADConfig) -> bool:
    return config.lambda_f > 0 and config.proxy_steps > 0


def joins_passes(config: UADConfig, device: torch.device) -> bool:
    """Whether a deformation step runs the target's and the proxy's encoder passes as one batch
    (config.join_passes; "auto": on CUDA, where a larger batch fills the GPU)."""
    return config.join_passes == "yes" or (config.join_passes == "auto" and device.type == "cuda")


def split_batch(feats: List[torch.Tensor], *sizes: int) -> tuple:
    """Splits features of a concatenated batch, each (B1 + B2 + ..., ...), into one feature list
    per part (the last part takes the rest)."""
    sizes = (*sizes, len(feats[0]) - sum(sizes))
    return tuple(list(part) for part in zip(*(f.split(sizes) for f in feats)))


def backward_with_fidelity(loss, target, proxy, image, f_image, surrogate, config, gen, momentum):
    """Adds L_F to stage 1's loss, backpropagates both, and takes the proxy's T_f PGD steps.

    The proxy I + r' is stage 2 warm-started inside stage 1: it follows stage 2's objective
    towards the current target, T_f PGD steps per deformation step, continuing where the
    previous step left it. L_F = d(f(I + r'), f(I_hat)) asks that the target's features stay
    reachable inside the budget. Its gradient reaches the flow through
    f(I_hat) <- I_hat = warp(I, w) <- w, with the proxy's features held fixed, so L_F moves the
    target towards what the proxy reaches, never the proxy. The same backward pass gives the
    proxy the gradient of its own objective (the target's features held fixed): the first of
    its T_f steps. A deformation step therefore costs 1 + T_f encoder forwards and backwards.

    The paper alternates one flow update with T_f proxy updates without fixing their order; here
    L_F at step t uses the proxy as it stood before step t's updates (r' = 0 at step 0), so that
    the flow's and the proxy's first gradients come from one backward pass.

    Args:
      loss: (B,) SSIM + lambda_C L_C, with the graph to the flow.
      target: (B, C, H, W) warp of the image, with the graph to the flow.
      proxy: (B, C, H, W) the proxy adversarial example, detached.

    Returns:
      (proxy after its T_f steps, L_F (B,) detached). Gradients are left in the flow's .grad.
    """
    proxy = proxy.detach().requires_grad_(True)
    view = encoder_view(proxy, config, gen)
    if joins_passes(config, target.device):
        # one call on the 2B images; the same features, in one pass over the weights
        both = surrogate(torch.cat([target, view]), backward_passes=2)
        f_target, f_proxy = (list(p) for p in zip(*(split_batch(f, len(target)) for f in both)))
        surrogate.stats.forwards += 1  # two images' forwards in one call
    else:
        f_target = surrogate(target, backward_passes=1)
        f_proxy = surrogate(view, backward_passes=1)
    fidelity = feature_distance(each_feature(torch.Tensor.detach, f_proxy), f_target)  # -> flow
    f_target = each_feature(torch.Tensor.detach, f_target)
    proxy_loss = simulation_loss(f_proxy, f_target, f_image)  # -> the proxy only
    (loss + config.lambda_f * fidelity + proxy_loss).sum().backward()
    proxy = pgd_step(proxy.detach(), proxy.grad, image, config, momentum)
    for _ in range(config.proxy_steps - 1):
        proxy, _ = refine(proxy, image, f_target, f_image, surrogate, config, gen, momentum)
    return proxy, fidelity.detach()


class Deformation(NamedTuple):
    target: torch.Tensor  # (B, C, H, W) in [0, 1]: the warped image
    ssim: torch.Tensor  # (B,) SSIM(target, image)
    flow: torch.Tensor  # (B, 2, H, W) the applied flow, pixels at the 1024 scale


def deform(image, f_image, surrogate: Ensemble, config: UADConfig, gen, progress=None):
    """Stage 1: the target I_hat = warp(I, flow) minimising SSIM + lambda_C L_C + lambda_F L_F.

    Args:
      image: (B, C, H, W) in [0, 1].
      f_image: the surrogates' features of `image`.

    Returns:
      Deformation(target, ssim, flow), detached.
    """
    b, _, h, w = image.shape
    block = 1024 / config.control_points  # pixels at the 1024 scale per control-grid block
    to_image_pixels = max(h, w) / 1024
    p = config.control_points
    ctrl = config.init_std * block * draws(gen, (b, config.num_flows, 2, p, p), torch.randn)
    ctrl = ctrl.to(image.device).requires_grad_(True)  # (B, K, 2, P, P), 1024-scale pixels
    cells = mosaic_cells(h, w, config, image.device)  # (1, K, 1, H, W)
    optimizer = torch.optim.Adam([ctrl], lr=config.deform_lr)
    proxy = image.clone()  # I + r', warm-started across deformation steps
    momentum = torch.zeros_like(image)
    if progress:
        progress("deform", 0, config.deform_steps)

    for step in range(config.deform_steps):
        flow = mosaic_flow(ctrl, cells)  # (B, 2, H, W), 1024-scale pixels
        ssim, target = warp_kernel.warp_ssim(
            image, flow * to_image_pixels, image, config.padding, impl=config.impl
        )
        loss = ssim + config.lambda_c * flow_regulariser(flow, config)
        optimizer.zero_grad()
        if uses_fidelity(config):
            proxy, fidelity = backward_with_fidelity(
                loss, target, proxy, image, f_image, surrogate, config, gen, momentum
            )
            loss = loss.detach() + config.lambda_f * fidelity
        else:
            loss.sum().backward()
        optimizer.step()
        if progress:
            progress("deform", step + 1, config.deform_steps, loss.mean().item())

    with torch.no_grad():
        flow = mosaic_flow(ctrl, cells)  # (B, 2, H, W), 1024-scale pixels
        ssim, target = warp_kernel.warp_ssim(
            image, flow * to_image_pixels, image, config.padding, impl=config.impl
        )
    return Deformation(target, ssim, flow)


# -----------------------------------------------------------------------------------------------
# Stage 2: feature simulation


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


def per_image(gen, n: int) -> list:
    """The generator of each of n images: `gen` itself when it is a list of them (one per image,
    as `attack` makes), else the one shared generator, drawn image after image."""
    return list(gen) if isinstance(gen, (list, tuple)) else [gen] * n


def draws(gen, shape, sample) -> torch.Tensor:
    """(B, ...) random CPU draws: image b's from its own generator (see per_image), each
    sample((1, ...), generator=g) as torch.randn takes them."""
    return torch.cat([sample((1, *shape[1:]), generator=g) for g in per_image(gen, shape[0])])


def uniform(eps: float):
    """A `draws` sample of uniform noise in [-eps, eps]."""
    return lambda size, generator: torch.empty(size).uniform_(-eps, eps, generator=generator)


def encoder_view(x: torch.Tensor, config: UADConfig, gen) -> torch.Tensor:
    """What the encoder sees of x during the attack: a publishing transformation drawn for each
    image (`robust`), then Gaussian noise of std encoder_noise. The perturbation itself, and so
    the saved image, is neither. The reference code calls the noise option "DI"."""
    if config.robust:
        x = publish(x, parse_robust(config.robust), gen)
    if config.encoder_noise > 0:
        x = x + config.encoder_noise * draws(gen, x.shape, torch.randn).to(x.device)
    return x


def refine(x, image, f_target, f_image, surrogate, config, gen, momentum):
    """One PGD step on stage 2's objective. Returns (x after the step, loss before it)."""
    x = x.detach().requires_grad_(True)
    loss = simulation_loss(
        surrogate(encoder_view(x, config, gen), backward_passes=1), f_target, f_image
    )
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return pgd_step(x.detach(), grad, image, config, momentum), loss.detach()


def simulate(image, f_target, f_image, surrogate: Ensemble, config: UADConfig, gen, progress=None):
    """Stage 2: L-infinity PGD from image towards the target's features. Returns (B, C, H, W)."""
    x = image.clone()
    if config.random_start:
        noise = draws(gen, image.shape, uniform(config.eps))
        x = project(image + noise.to(image.device), image, config.eps)
    momentum = torch.zeros_like(image)
    if progress:
        progress("simulate", 0, config.steps)
    for step in range(config.steps):
        x, loss = refine(x, image, f_target, f_image, surrogate, config, gen, momentum)
        if progress:
            progress("simulate", step + 1, config.steps, loss.mean().item())
    return x


# -----------------------------------------------------------------------------------------------
# The attack and the library entry point


class AttackResult(NamedTuple):
    adv: torch.Tensor  # (B, C, H, W) in [0, 1], within eps of the image (not yet quantised)
    target: torch.Tensor  # (B, C, H, W) the deformed target of stage 1
    stats: Stats


def attack(
    image: torch.Tensor, sam, config: UADConfig, progress=None, target_image=None
) -> AttackResult:
    """Both stages on a batch of images (B, C, H, W) in [0, 1]; everything returned detached.

    sam is the surrogate: a SAM-family model (SAM, SAM-HQ, MobileSAM, SAM 2), a Surrogate, or a
    list of them, an ensemble whose feature distances both stages average (see Surrogate).
    config.method "aa" needs target_image, (1 or B, C, H', W') in [0, 1]: stage 2 then pulls
    towards its features instead of a deformed target's; "noise" draws uniform noise only.
    progress, if given, is called as progress(stage, step, total, loss): with step 0 (and no
    loss) when a stage starts, then after each of its steps. Every image draws its random
    numbers from its own generator seeded with config.seed, so that what the attack does to an
    image does not depend on the other images of the batch.
    """
    surrogates = surrogates_of(sam)
    for s in surrogates:
        s.check(config)
    if (config.method == "aa") != (target_image is not None):
        raise UADError("the aa baseline, and only it, takes a target image")
    stats, start = Stats(), time.monotonic()
    surrogate = Ensemble(surrogates, config, stats)
    # one generator per image, each seeded with config.seed: an image draws the same numbers
    # whatever batch it is in; CPU draws, the same on every device
    gen = [torch.Generator().manual_seed(config.seed) for _ in range(len(image))]
    with torch.no_grad():
        f_image = surrogate(image)
    if config.method == "uad":
        target, target_ssim, _ = deform(image, f_image, surrogate, config, gen, progress)
        with torch.no_grad():
            f_target = surrogate(target)
        adv = simulate(image, f_target, f_image, surrogate, config, gen, progress)
        stats.target_ssim = target_ssim.tolist()
    elif config.method == "aa":
        target = target_image.to(image)
        with torch.no_grad():
            f_target = each_feature(lambda f: f.expand(len(image), *f.shape[1:]), surrogate(target))
        adv = simulate(image, f_target, None, surrogate, config, gen, progress)
    else:
        target = image
        noise = draws(gen, image.shape, uniform(config.eps))
        adv = project(image + noise.to(image.device), image, config.eps)
    with torch.no_grad():
        # 1 - cosine can round to just below 0 for near-identical features
        distance = feature_distance(surrogate(adv), f_image).clamp_min(0)
    stats.forwards -= 1  # the final measurement is not part of the attack
    stats.feature_distance = distance.tolist()
    stats.seconds = time.monotonic() - start
    return AttackResult(adv, target, stats)


def quantize(adv: torch.Tensor, image: torch.Tensor, eps: float) -> torch.Tensor:
    """Rounds adv onto the uint8 lattice inside the budget.

    For an image on the lattice (k / 255), every pixel of the result is within
    floor(eps * 255) grey levels of it, so max |result - image| <= eps holds exactly.
    """
    k = math.floor(eps * 255 + 1e-6)
    a, i = (adv * 255).round(), (image * 255).round()
    return torch.min(torch.max(a, i - k), i + k).clamp(0, 255) / 255


def protect(
    image, sam=None, *, config: Optional[UADConfig] = None, progress=None, stats=None, target=None
):
    """Protects an image against promptable segmentation with UAD.

    Args:
      image: one of
        - torch.Tensor (B, C, H, W) float in [0, 1], C = 3 (RGB) or 1 (grey), on any device;
        - np.ndarray (H, W, 3) or (H, W) uint8;
        - PIL.Image.Image (any mode; an alpha channel and an ICC profile are carried through).
      sam: the surrogate: a SAM-family model (a segment_anything Sam, a SAM-HQ, MobileSAM or
        SAM 2 model), a Surrogate, or a list of them (an ensemble, on one device); None loads
        the official ViT-B (downloading it on first use) onto CUDA when available.
      config: attack settings; None is the `paper` preset.
      progress: callable(stage, step, total, loss=None), e.g. Progress(); None is silent.
      stats: a Stats to fill with what the attack did.
      target: the other image of the `aa` baseline, of the same kinds as `image`.

    Returns:
      The protected image, of the same kind as `image`: a float tensor within eps of the input;
      or uint8 pixels / a PIL image rounded onto the uint8 lattice, exactly within eps.
    """
    config = config or UADConfig()
    lattice = not isinstance(image, torch.Tensor)
    if lattice and math.floor(config.eps * 255 + 1e-6) < 1:
        raise UADError(
            f"eps {config.eps:g} is below one grey level (1/255 = {1 / 255:.4f}): "
            "a uint8 image cannot change"
        )
    surrogates = surrogates_of(
        sam if sam is not None else load_sam("vit_b", None, resolve_device("auto"))
    )
    device = surrogates[0].device
    if target is not None:
        if isinstance(target, torch.Tensor):
            target = target.to(device, torch.float32)
        else:
            target = to_tensor(to_picture(target).pixels, device)
        target = target.expand(-1, 3, -1, -1)
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[1] not in (1, 3) or not image.is_floating_point():
            raise UADError(f"expected a float (B, 1 or 3, H, W) tensor, got {tuple(image.shape)}")
        adv, _, s = attack(image.to(device, torch.float32), surrogates, config, progress, target)
        result = adv.to(image.device, image.dtype)
    elif isinstance(image, (np.ndarray, Image.Image)):
        picture = to_picture(image)
        x = to_tensor(picture.pixels, device)
        adv, _, s = attack(x, surrogates, config, progress, target)
        pixels = to_pixels(quantize(adv, x, config.eps))
        result = picture.to_pil(pixels) if isinstance(image, Image.Image) else pixels
    else:
        raise UADError(
            f"cannot protect a {type(image).__name__}; pass a tensor, array or PIL image"
        )
    if stats is not None:
        vars(stats).update(vars(s))
    return result


# -----------------------------------------------------------------------------------------------
# Publishing, differentiably (--robust): JPEG as PIL's libjpeg-turbo codes it, and PIL's bicubic
# downscale and upscale. Every rounding to integers is exact in the forward pass and the
# identity in the backward pass (straight-through), so gradients reach the image.

# ITU-T T.81 Annex K quantisation tables (quality 50), row-major over (vertical, horizontal)
JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56), (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)  # fmt: skip
JPEG_CHROMA = ((17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99),
               (24, 26, 56, 99, 99, 99, 99, 99), (47, 66, 99, 99, 99, 99, 99, 99),
               *[(99,) * 8] * 4)  # fmt: skip
ROBUST_RANGES = {"jpeg": (1, 100), "resize": (0.0, 1.0)}  # allowed parameter ranges


def parse_robust(spec: str) -> list:
    """Parses "jpeg:50-95,resize:0.5-1,none" into [(kind, low, high), ...]; UADError if bad."""
    items = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, values = item.partition(":")
        if kind == "none" and not values:
            items.append(("none", 0.0, 0.0))
            continue
        if kind not in ROBUST_RANGES or not values:
            raise UADError(f"robust {spec!r}: {item!r} is not jpeg:Q[-Q], resize:S[-S] or none")
        try:
            low, _, high = values.partition("-")
            low, high = float(low), float(high or low)
        except ValueError:
            raise UADError(f"robust {spec!r}: {item!r} has no number range") from None
        bottom, top = ROBUST_RANGES[kind]
        fits = bottom <= low <= high <= top if kind == "jpeg" else bottom < low <= high <= top
        if not fits:
            raise UADError(f"robust {spec!r}: {kind} takes values in {bottom:g}..{top:g}")
        items.append((kind, low, high))
    return items


def publish(x: torch.Tensor, kinds: list, gen) -> torch.Tensor:
    """Each image of x (B, C, H, W) in [0, 1] through one transformation drawn from `kinds`
    (gen: a generator, or one per image; see per_image)."""
    out = []
    for image, g in zip(x.split(1), per_image(gen, len(x))):
        kind, low, high = kinds[int(torch.randint(len(kinds), (), generator=g))]
        value = low + (high - low) * float(torch.rand((), generator=g))
        if kind == "jpeg":
            image = jpeg(image, round(value))
        elif kind == "resize":
            image = resize_round_trip(image, value)
        out.append(image)
    return torch.cat(out)


def straight_round(x: torch.Tensor) -> torch.Tensor:
    """Rounds to integers in the forward pass; the identity in the backward pass."""
    return x + (x.round() - x).detach()


def resize_round_trip(x: torch.Tensor, scale: float, rounding: bool = True) -> torch.Tensor:
    """PIL's bicubic downscale by `scale` to uint8, then back to (H, W): (B, C, H, W) in [0, 1].

    torch's antialiased bicubic uses PIL's filter (a = -0.5, support scaled with the factor).
    """
    h, w = x.shape[-2:]
    r = straight_round if rounding else (lambda t: t)
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(x * 255, small, mode="bicubic", antialias=True, align_corners=False)
    x = r(x.clamp(0, 255))
    x = F.interpolate(x, (h, w), mode="bicubic", antialias=True, align_corners=False)
    return r(x.clamp(0, 255)) / 255


def jpeg_table(base, quality: int, like: torch.Tensor) -> torch.Tensor:
    """libjpeg's jpeg_quality_scaling of a base table, clamped to baseline values: (8, 8)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = [[min(max((b * scale + 50) // 100, 1), 255) for b in row] for row in base]
    return torch.tensor(table, dtype=like.dtype, device=like.device)


def jpeg(x: torch.Tensor, quality: int, rounding: bool = True) -> torch.Tensor:
    """JPEG encode + decode at `quality`, differentiably: (B, C, H, W) in [0, 1], C = 3 or 1.

    As PIL saves (libjpeg-turbo, baseline, 4:2:0 chroma subsampling) and decodes it (fancy
    upsampling): RGB to YCbCr (JFIF), chroma averaged over 2 x 2 pixels, each plane padded by
    edge replication to whole 8 x 8 blocks, DCT, quantisation by the standard tables scaled by
    quality, inverse DCT, chroma upsampled by libjpeg's triangle filter, back to RGB. rounding
    False leaves out every rounding (a smooth function, for checking gradients).
    """
    r = straight_round if rounding else (lambda t: t)
    n = torch.arange(8, dtype=x.dtype, device=x.device)
    dct = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * 0.5  # (8, 8) orthonormal
    dct[0] /= math.sqrt(2)

    def code(plane, table):  # (B, 1, h, w) samples 0..255 -> decoded samples, same shape
        h, w = plane.shape[-2:]
        plane = F.pad(plane - 128, (0, -w % 8, 0, -h % 8), mode="replicate")
        b, _, ph, pw = plane.shape
        blocks = plane.view(b, ph // 8, 8, pw // 8, 8).transpose(2, 3)  # (B, by, bx, 8, 8)
        coef = r((dct @ blocks @ dct.T) / table) * table
        plane = (dct.T @ coef @ dct).transpose(2, 3).reshape(b, 1, ph, pw)
        return r(plane[..., :h, :w] + 128).clamp(0, 255)

    quality = min(max(int(quality), 1), 100)
    luma = jpeg_table(JPEG_LUMA, quality, x)
    v = x * 255
    if v.shape[1] == 1:
        return code(r(v), luma) / 255
    chroma = jpeg_table(JPEG_CHROMA, quality, x)
    red, green, blue = v.split(1, dim=1)
    y = code(r(0.299 * red + 0.587 * green + 0.114 * blue), luma)
    cb = r(-0.168735892 * red - 0.331264108 * green + 0.5 * blue + 128)
    cr = r(0.5 * red - 0.418687589 * green - 0.081312411 * blue + 128)
    h, w = v.shape[-2:]
    cb, cr = (
        r(upsample_chroma(code(subsample_chroma(c, r), chroma), h, w)) - 128 for c in (cb, cr)
    )
    rgb = torch.cat([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], 1)
    return r(rgb).clamp(0, 255) / 255


def subsample_chroma(c: torch.Tensor, r) -> torch.Tensor:
    """4:2:0: the mean of each 2 x 2 pixels, an odd edge replicated: (B, 1, ceil(H/2), ceil(W/2))."""
    h, w = c.shape[-2:]
    return r(F.avg_pool2d(F.pad(c, (0, w % 2, 0, h % 2), mode="replicate"), 2))


def upsample_chroma(c: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """libjpeg's h2v2 fancy upsampling: each output sample is 3/4 of its nearer input sample and
    1/4 of the next one, in each direction, edges replicated; cropped to (h, w)."""
    p = F.pad(c, (0, 0, 1, 1), mode="replicate")
    mid = 3 * p[..., 1:-1, :]
    rows = torch.stack([mid + p[..., :-2, :], mid + p[..., 2:, :]], dim=-2).flatten(-3, -2)
    p = F.pad(rows, (1, 1, 0, 0), mode="replicate")
    mid = 3 * p[..., 1:-1]
    out = torch.stack([mid + p[..., :-2], mid + p[..., 2:]], dim=-1).flatten(-2) / 16
    return out[..., :h, :w]


# ===============================================================================================
# Plumbing: models and checkpoints, image files, progress lines
# ===============================================================================================

# encoder width, depth, heads and global-attention blocks, as in segment_anything.build_sam; the
# ViT encoders of SAM-HQ (hq_vit_b, hq_vit_l, hq_vit_h) have the same shapes
SAM_ARCHS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


@dataclass(frozen=True)
class Family:
    """What every model of one family shares: where it comes from and how it sees an image."""

    title: str  # as the README's model table names it
    module: str  # the package's import name, imported only when one of its models is asked for
    install: str  # the command that provides the module and everything it imports
    preprocessing: str  # what its predictor does to an (H, W, 3) uint8 RGB image
    state_key: Optional[str] = None  # official checkpoints nest the state dict under this key


_SAM_PIXELS = (
    "longest side resized to 1024 (bilinear), 0-255 scale normalised by the ImageNet mean and "
    "std times 255, zero-padded to 1024 x 1024"
)
MODEL_FAMILIES = {
    "sam": Family("SAM", "segment_anything", "pip install segment-anything", _SAM_PIXELS),
    "sam_hq": Family(
        "SAM-HQ", "segment_anything_hq", "pip install segment-anything-hq timm", _SAM_PIXELS
    ),
    # mobilesam-mirror is the registry's copy of MobileSAM; it provides the `mobile_sam` module
    "mobile_sam": Family(
        "MobileSAM", "mobile_sam", "pip install mobilesam-mirror timm", _SAM_PIXELS
    ),
    # sam2 compiles a CUDA extension unless SAM2_BUILD_CUDA=0; the image predictor does not use it
    "sam2": Family(
        "SAM 2 / SAM 2.1",
        "sam2",
        "SAM2_BUILD_CUDA=0 pip install sam2",
        "resized to 1024 x 1024 (bilinear, aspect ratio not kept), [0, 1] scale normalised by "
        "the ImageNet mean and std",
        state_key="model",
    ),
    # AGPL-3.0: never vendored; imported only when FastSAM is asked for
    "fastsam": Family(
        "FastSAM",
        "ultralytics",
        "pip install ultralytics",
        "BGR, letterboxed: longest side resized to imgsz = max(H, W) rounded up to a multiple of "
        "32 (bilinear), short side padded with grey 114 to a multiple of 32, [0, 1] scale",
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model name that uad.load_model accepts (see MODELS)."""

    family: str  # key of MODEL_FAMILIES
    arch: str  # the package's builder key, or SAM 2's config file
    overrides: tuple = ()  # SAM 2: hydra overrides to its config (tests shrink it)

    @property
    def info(self) -> Family:
        return MODEL_FAMILIES[self.family]


SAM2_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
MODELS = {
    **{t: ModelSpec("sam", t) for t in SAM_ARCHS},
    **{f"hq_{t}": ModelSpec("sam_hq", t) for t in (*SAM_ARCHS, "vit_tiny")},
    "mobile_sam": ModelSpec("mobile_sam", "vit_t"),
    **{
        f"sam2{v}_{s}": ModelSpec("sam2", f"configs/sam2{v}/sam2{v}_hiera_{s}.yaml")
        for v in ("", ".1")
        for s in SAM2_SIZES
    },
    # ultralytics' YOLOv8 segmentation model, built from the description its checkpoint carries
    # (yolov8x-seg with one class for FastSAM-x, the default; arch is what a random-init build
    # without a checkpoint takes)
    "fastsam": ModelSpec("fastsam", "yolov8x-seg.yaml"),
}

# Official checkpoints: name -> (URL, SHA-256, or None where the authors publish no checksum).
# Meta publishes checksums for SAM's three only; SAM 2's release script, SAM-HQ's model card,
# MobileSAM's repository and ultralytics' assets give none, so a download of theirs prints the
# SHA-256 it got.
_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_{}.pth"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/{}/sam2{}_hiera_{}.pt"
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
    **{f"hq_{t}": (_HQ_URL.format(t), None) for t in (*SAM_ARCHS, "vit_tiny")},
    "mobile_sam": (
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        None,
    ),
    **{f"sam2_{s}": (_SAM2_URL.format("072824", "", size), None) for s, size in SAM2_SIZES.items()},
    **{
        f"sam2.1_{s}": (_SAM2_URL.format("092824", ".1", size), None)
        for s, size in SAM2_SIZES.items()
    },
    # ultralytics' own download location for it (ultralytics.utils.downloads, release v8.4.0)
    "fastsam": (
        "https://github.com/ultralytics/assets/releases/download/v8.4.0/FastSAM-x.pt",
        None,
    ),
}
# Blocks per stage of the hierarchical surrogates as their packages build them (a test checks
# them), to check --stage-layers before any model loads; SAM v1's depths are in SAM_ARCHS.
HIERA_STAGES = {"t": (1, 2, 7, 2), "s": (1, 2, 11, 2), "b+": (2, 3, 16, 3), "l": (2, 6, 36, 4)}
SURROGATE_FAMILIES = ("sam", "sam2", "mobile_sam")  # the MODEL_FAMILIES a Surrogate class fits
SURROGATE_STAGES = {
    **{f"sam2{v}_{s}": HIERA_STAGES[s] for v in ("", ".1") for s in SAM2_SIZES},
    "mobile_sam": (2, 2, 6, 2),
}
# Seconds of one forward and one forward+backward of blocks 1-7 of ViT-B at 1024 on 2 cores
# per encoder dtype (AMD EPYC with AVX512-BF16, SAM's attention; benchmarks/attack_cost.py), and
# the GFLOPs of that forward as `forward_gflops` counts them: the CPU estimate prices every
# surrogate's passes at this rate.
CPU_PASS_SECONDS = {"float32": (6.99, 17.31), "bfloat16": (3.63, 7.42)}
CPU_PASS_GFLOPS = 550.17


def build_sam(model_type: str = "vit_b", arch: Optional[dict] = None):
    """A random-init segment_anything Sam of SAM_ARCHS[model_type] (or of `arch`), in eval mode."""
    from segment_anything.build_sam import _build_sam

    a = arch or SAM_ARCHS[model_type]
    sam = _build_sam(
        encoder_embed_dim=a["embed_dim"],
        encoder_depth=a["depth"],
        encoder_num_heads=a["num_heads"],
        encoder_global_attn_indexes=list(a["global_attn_indexes"]),
    )
    return sam.eval()


def check_checkpoint_file(path) -> Path:
    """`path` as a Path if it is a file; UADError naming the problem if not."""
    path = Path(path)
    if not path.is_file():
        raise UADError(f"{path}: {'is a folder' if path.is_dir() else 'no such checkpoint file'}")
    return path


def unreadable_reason(path: Path, error: Exception, objects: str) -> str:
    """Why a checkpoint reader failed on `path` with `error`, from the file's first bytes and, for
    a zip archive, the globals its pickle names; `objects` says what such globals are."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # a bare pickle: an old format, or arbitrary Python objects
        return "not weights-only: it holds Python objects that are not tensors"
    if not head.startswith(b"PK"):
        return "not a PyTorch file"
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return "truncated or corrupt"
    if names:
        return f"not weights-only: {objects} ({few(names)})"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def read_checkpoint(path) -> object:
    """torch.load(path) on the CPU, weights only; any problem is one UADError line."""
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = unreadable_reason(path, e, "it holds Python objects that are not tensors")
        raise UADError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $UNSEGMENT_CACHE, else ~/.cache/unsegment."""
    return Path(os.environ.get("UNSEGMENT_CACHE", "~/.cache/unsegment")).expanduser()


def download(url: str, dest: Path, sha256: Optional[str], quiet: bool = False) -> Path:
    """Downloads `url` to `dest` atomically, checking its SHA-256 unless None; returns `dest`."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise UADError(f"{dest.parent}: cannot write the checkpoint cache ({e.strerror})") from None
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
        if sha256 is not None and digest.hexdigest() != sha256:
            raise UADError(f"{url}: SHA-256 mismatch (got {digest.hexdigest()}, want {sha256})")
        if sha256 is None and not quiet:
            print(f"{dest}: no published checksum; SHA-256 {digest.hexdigest()}", file=sys.stderr)
        os.chmod(tmp, default_file_mode(dest))
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UADError(
            f"{url}: download failed ({reason}); download it by hand to {dest} or pass its "
            "path (--checkpoint PATH; NAME=PATH in eval.py's --models)"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_checkpoint(name: str, quiet: bool = False) -> Path:
    """The official checkpoint of model `name` in the cache folder, downloaded if missing."""
    if name not in CHECKPOINT_URLS:
        raise UADError(f"no official checkpoint for model {name!r}; pass its checkpoint's path")
    url, sha256 = CHECKPOINT_URLS[name]
    path = cache_dir() / url.rsplit("/", 1)[1]
    return path if path.is_file() else download(url, path, sha256, quiet=quiet)


def import_family(name: str):
    """The package module of model `name` (a key of MODELS), imported now; UADError naming the
    module that is really missing (SAM-HQ and MobileSAM import timm without declaring it)."""
    family = MODELS[name].info
    try:
        module = importlib.import_module(family.module)
    except ImportError as e:
        missing = (e.name or family.module).split(".")[0]  # the package, not a submodule
        via = "" if missing == family.module else f" (imported by {family.module})"
        raise UADError(
            f"model {name} needs the {missing} package{via}, which is not installed: "
            f"{family.install}"
        ) from None
    if family.module == "ultralytics":
        unpatch_ultralytics()
    return module


def unpatch_ultralytics() -> None:
    """Undoes what importing ultralytics does to other packages: it replaces PIL's Image.open
    with one that pip-installs pi-heif when PIL cannot identify a file, and torch.save with its
    own. Its code keeps calling the originals, which it saved."""
    from ultralytics.utils import patches

    if Image.open is patches.image_open:
        Image.open = patches._image_open
    if torch.save is patches.torch_save:
        torch.save = patches._torch_save


def checkpoint_arch(state: dict) -> dict:
    """Encoder width and depth of a SAM state dict, read from its tensor shapes."""
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    return dict(embed_dim=state["image_encoder.pos_embed"].shape[-1], depth=depth)


def check_vit_arch(state: dict, path: Path, name: str, prefix: str = "") -> None:
    """For the ViT encoders of SAM_ARCHS: UADError naming the model type a checkpoint is of, when
    it is not `name`'s (a clearer line than the shape mismatch load_weights would find)."""
    if "image_encoder.pos_embed" not in state:
        raise UADError(f"{path}: not a {MODELS[name].info.title} checkpoint (no image encoder)")
    arch, want = checkpoint_arch(state), SAM_ARCHS[MODELS[name].arch]
    if (arch["embed_dim"], arch["depth"]) != (want["embed_dim"], want["depth"]):
        match = [
            t for t, a in SAM_ARCHS.items() if (a["embed_dim"], a["depth"]) == tuple(arch.values())
        ]
        what = f"a {prefix}{match[0]} checkpoint" if match else "of an unknown architecture"
        raise UADError(
            f"{path}: checkpoint is {what} (width {arch['embed_dim']}, {arch['depth']} blocks), "
            f"not {name}; pass the matching model type"
        )


def few(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_weights(model: torch.nn.Module, state, path, name: str) -> None:
    """Loads a state dict into `model` strictly; the one place every model's weights go through.

    Unlike the packages' own loaders (which drop unexpected keys), a checkpoint of another model
    is refused: a tensor the model lacks, a tensor it has that the checkpoint lacks, or a shape
    that differs is a UADError line naming how many, and the first few or the first tensor with
    both shapes.
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UADError(f"{path}: not a state dict of tensors")
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    if extra:
        raise UADError(
            f"{path}: not a {name} checkpoint: {len(extra)} tensor(s) that {name} does not have "
            f"({few(extra)})"
        )
    missing = [k for k in own if k not in state]
    if missing:
        raise UADError(
            f"{path}: not a {name} checkpoint: {len(missing)} of {name}'s tensor(s) missing "
            f"({few(missing)})"
        )
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise UADError(
                f"{path}: weights do not fit {name}: {key} is {tuple(tensor.shape)} in the "
                f"checkpoint, {tuple(own[key].shape)} in the model"
            )
    model.load_state_dict(state, strict=True)


def build_model(name: str, description=None) -> torch.nn.Module:
    """A random-init model `name` (a key of MODELS) from its package's own builder, on the CPU.

    `description` is FastSAM's only: the ultralytics model description (a dict, as a checkpoint's
    model carries it) to build instead of MODELS["fastsam"].arch with one class.
    """
    spec = MODELS[name]
    module = import_family(name)
    if spec.family == "sam":
        return build_sam(spec.arch)
    if spec.family == "sam2":
        from sam2.build_sam import build_sam2

        return build_sam2(spec.arch, None, device="cpu", hydra_overrides_extra=list(spec.overrides))
    if spec.family == "fastsam":
        from ultralytics.nn.tasks import SegmentationModel, yaml_model_load

        if description is None:
            description = {**yaml_model_load(spec.arch), "nc": 1}
        return SegmentationModel(description, verbose=False)
    if spec.arch in SAM_ARCHS:  # SAM-HQ's ViTs: its registry's builder, with SAM_ARCHS's shapes
        from segment_anything_hq.build_sam import _build_sam

        a = SAM_ARCHS[spec.arch]
        return _build_sam(
            a["embed_dim"], a["depth"], a["num_heads"], list(a["global_attn_indexes"])
        )
    return module.sam_model_registry[spec.arch](checkpoint=None)  # the TinyViT models


def check_model_checkpoint(name: str, path) -> Path:
    """`path` as a Path if it can be model `name`'s checkpoint file; UADError if not."""
    path = check_checkpoint_file(path)
    if MODELS[name].family == "fastsam" and path.suffix != ".pt":  # ultralytics reads no other
        raise UADError(f"{path}: a FastSAM checkpoint is an ultralytics .pt file")
    return path


def read_ultralytics_checkpoint(path: Path) -> tuple:
    """(model description, state dict) of an ultralytics segmentation checkpoint.

    Its checkpoints are pickled models, which torch's plain weights-only reader refuses;
    ultralytics' own reader (torch_safe_load with safe_only) reads them weights-only too, against
    its allow-list of its model classes, so a file still cannot run code. UADError for any
    problem.
    """
    from ultralytics.nn.tasks import SegmentationModel, torch_safe_load
    from ultralytics.utils import LOGGER

    path = check_model_checkpoint("fastsam", path)
    level = LOGGER.level
    try:
        LOGGER.setLevel("ERROR")  # its warnings about odd files would break the one-line error
        ckpt, _ = torch_safe_load(path, safe_only=True)
    except Exception as e:  # ultralytics raises TypeError, RuntimeError, AttributeError, ...
        reason = unreadable_reason(path, e, "objects outside ultralytics' model classes")
        raise UADError(f"{path}: not a readable ultralytics checkpoint ({reason})") from None
    finally:
        LOGGER.setLevel(level)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, SegmentationModel):
        what = type(model).__name__ if model is not None else "no model"
        raise UADError(f"{path}: not a FastSAM checkpoint ({what}, not a segmentation model)")
    return model.yaml, model.float().state_dict()


def load_model(name: str, checkpoint=None, device="cpu", quiet: bool = False) -> torch.nn.Module:
    """Builds model `name` with its package's builder and loads its weights.

    Args:
      name: a key of MODELS (vit_b, hq_vit_tiny, mobile_sam, sam2.1_t, ...).
      checkpoint: path to its checkpoint; None takes the official one from the cache folder (see
        `cache_dir`), downloading it on first use (SHA-256 checked where one is published).
      device: where the model lives.
      quiet: no download progress line.

    Returns:
      The package's model (segment_anything's Sam, SAM2Base, ...) in eval mode, parameters
      frozen, on `device`. Any problem (unknown name, missing package, unreadable checkpoint, a
      checkpoint of another model) is a one-line UADError.
    """
    if name not in MODELS:
        raise UADError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    import_family(name)  # before any download: a missing package is the first thing to say
    path = Path(checkpoint) if checkpoint is not None else find_checkpoint(name, quiet)
    if spec.family == "fastsam":
        description, state = read_ultralytics_checkpoint(path)
        model = build_model(name, description)
    else:
        state = read_checkpoint(path)
        key = spec.info.state_key
        if key is not None and isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
        if not isinstance(state, dict):
            raise UADError(f"{path}: not a state dict")
        if spec.arch in SAM_ARCHS:
            check_vit_arch(state, path, name, prefix="hq_" if spec.family == "sam_hq" else "")
        model = build_model(name)
    load_weights(model, state, path, name)
    return model.eval().requires_grad_(False).to(device)


def load_sam(model_type: str = "vit_b", checkpoint=None, device="cpu", quiet: bool = False):
    """Builds SAM `model_type` ("vit_b" | "vit_l" | "vit_h") and loads its weights.

    Args:
      model_type: the architecture; a checkpoint of another one is an error.
      checkpoint: path to a .pth state dict; None takes the official one from the cache folder
        (see `cache_dir`), downloading it from Meta's URL on first use.
      device: where the model lives.
      quiet: no download progress line.

    Returns:
      segment_anything.modeling.Sam in eval mode with frozen parameters (see `load_model`).
    """
    if model_type not in SAM_ARCHS:
        raise UADError(f"unknown model type {model_type!r}; choose from {', '.join(SAM_ARCHS)}")
    return load_model(model_type, checkpoint, device, quiet)


def resolve_device(name: str) -> torch.device:
    """A torch.device from "auto" (CUDA when available, else the CPU), "cpu", "cuda[:N]" or
    "mps"; UADError for anything else or for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UADError(
            f"device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UADError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UADError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UADError(f"device {name!r} requested but MPS is not available")
    elif device.type != "cpu":
        raise UADError(f"device {name!r}: not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def forward_gflops(surrogate: Surrogate, config: UADConfig) -> float:
    """GFLOPs of one pass computing f through `surrogate` at its input size (matrix products,
    convolutions and attention, as torch.utils.flop_counter counts them), counted on fake
    tensors: nothing is computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    size = surrogate.input_size
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        x = torch.rand(1, 3, size, size, device=surrogate.device)
        with FlopCounterMode(display=False) as counter:
            surrogate.features(x, config)
    return counter.get_total_flops() / 1e9


def cpu_estimate(config: UADConfig, gflops: float, threads: int) -> float:
    """A plain estimate of one image's attack time on a CPU, in seconds: the passes of
    encoder_passes(config) through surrogates whose feature passes make `gflops` GFLOPs in all
    (see forward_gflops), priced at CPU_PASS_SECONDS per CPU_PASS_GFLOPS and shared by the
    threads. The encoders run at their own input size whatever the image's, so neither changes
    the cost. Encoders of small depthwise convolutions (TinyViT) run below that rate."""
    forwards, backwards = encoder_passes(config)
    forward, both = CPU_PASS_SECONDS[config.dtype]
    scale = gflops / CPU_PASS_GFLOPS * 2 / max(1, min(threads, os.cpu_count() or 1))
    return ((forwards - backwards) * forward + backwards * both) * scale


# -----------------------------------------------------------------------------------------------
# Image files: reading any PIL format, writing exactly and atomically

# PIL's own limit against decompression bombs (about 9459 x 9459): beyond it, --max-pixels
MAX_PIXELS = 89_478_485


@dataclass
class Picture:
    """A decoded image: the pixels we attack and what we carry through untouched."""

    pixels: np.ndarray  # (H, W, 3) RGB or (H, W) grey, uint8
    alpha: Optional[np.ndarray] = None  # (H, W) uint8, or None
    icc_profile: Optional[bytes] = None  # the input's colour profile, when it fits the pixels
    frames: int = 1  # frames or pages of the file; only the first is read

    @property
    def mode(self) -> str:
        return ("L" if self.pixels.ndim == 2 else "RGB") + ("A" if self.alpha is not None else "")

    def to_pil(self, pixels: Optional[np.ndarray] = None) -> Image.Image:
        p = self.pixels if pixels is None else pixels
        channels = p if self.alpha is None else np.dstack([p, self.alpha])
        im = Image.fromarray(channels, self.mode)
        if self.icc_profile:
            im.info["icc_profile"] = self.icc_profile
        return im


GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def matching_profile(profile: Optional[bytes], mode: str) -> Optional[bytes]:
    """The ICC profile if its colour space (header bytes 16-19) is that of our pixels, else None
    (a CMYK file's profile does not describe the RGB we convert it to)."""
    if not profile or len(profile) < 20:
        return None
    space = profile[16:20]
    return profile if space == (b"GRAY" if mode.startswith("L") else b"RGB ") else None


def read_image(path, max_pixels: Optional[int] = MAX_PIXELS) -> Picture:
    """Reads an image file into 8-bit RGB or grey pixels plus an optional alpha channel.

    EXIF orientation is applied; palette, CMYK and other colour modes become RGB; 16-bit and
    float grey images are scaled to 8 bits; an RGB or grey ICC profile is kept. Only the first
    frame of an animation or multi-page file is read (Picture.frames counts them). An image of
    more than max_pixels pixels (None: no limit) is refused from its header, before decoding.
    Any problem raises UADError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise UADError(f"{path}: is a folder, expected an image file")
    if not path.exists():
        raise UADError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UADError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            # our own limit below replaces PIL's decompression-bomb warning and error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
        with im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise UADError(
                    f"{path}: image is {w}x{h} ({w * h / 1e6:.0f} Mpx), over the limit of "
                    f"{max_pixels} pixels against decompression bombs; pass --max-pixels "
                    f"{w * h} to process it"
                )
            frames = getattr(im, "n_frames", 1)
            im.load()
            picture = to_picture(im)  # applies the EXIF orientation, keeps a fitting profile
    except Image.UnidentifiedImageError:
        raise UADError(f"{path}: not an image file that PIL can read") from None
    except PermissionError:
        raise UADError(f"{path}: cannot be read (Permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UADError(f"{path}: truncated or corrupt image ({e})") from None
    h, w = picture.pixels.shape[:2]
    if min(h, w) < 16:
        raise UADError(f"{path}: image is {w}x{h}, at least 16x16 needed")
    picture.frames = frames
    return picture


def to_picture(image) -> Picture:
    """A uint8 array or PIL image as a Picture (RGB or grey pixels plus optional alpha)."""
    if isinstance(image, Image.Image):
        im = ImageOps.exif_transpose(image)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        alpha = np.asarray(im.getchannel("A")) if im.mode in ALPHA_MODES else None
        if im.mode.startswith("I") or im.mode == "F":  # 16-bit or float grey, scaled to 8 bits
            a = np.asarray(im, dtype=np.float64)
            top = 1.0 if im.mode == "F" and a.max() <= 1.0 else 65535.0 if a.max() > 255 else 255.0
            pixels = np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8)
        else:
            pixels = np.asarray(im.convert("L" if im.mode in GREY_MODES else "RGB"))
        profile = matching_profile(
            image.info.get("icc_profile"), "L" if pixels.ndim == 2 else "RGB"
        )
        return Picture(np.ascontiguousarray(pixels), alpha, profile)
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))
    ):
        raise UADError(
            f"expected a uint8 (H, W, 3) or (H, W) array, got {image.dtype} {image.shape}"
        )
    return Picture(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def to_tensor(pixels: np.ndarray, device="cpu") -> torch.Tensor:
    """(H, W, 3) or (H, W) uint8 -> (1, C, H, W) float in [0, 1]."""
    t = torch.from_numpy(np.array(pixels)).to(device)  # a copy: PIL arrays are read-only
    t = t[..., None] if t.ndim == 2 else t
    return t.permute(2, 0, 1)[None].float() / 255


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) float on the uint8 lattice -> (H, W, C) or (H, W) uint8."""
    a = (x[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two [0, 1] images, in dB (inf when identical)."""
    mse = (a - b).double().pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


LOSSY_FORMATS = {"JPEG"}  # written with a warning; everything else must hold the result exactly
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True, "exact": True}}
REFUSED_FORMATS = {"ICO": "icons are at most 256 px a side", "ICNS": "icons have fixed sizes"}


def output_format(path) -> str:
    """PIL format name for a file name's extension; PNG when it has none."""
    path = Path(path)
    if not path.suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UADError(f"{path}: cannot write images with extension {path.suffix!r}")
    return fmt


def in_layout_of(saved: Picture, written: Picture) -> Picture:
    """A re-read Picture in the layout written: a grey image that a format stores as three equal
    channels (WebP) comes back grey."""
    p = saved.pixels
    if p.ndim == 3 and written.pixels.ndim == 2 and (p == p[..., :1]).all():
        return dataclasses.replace(saved, pixels=np.ascontiguousarray(p[..., 0]))
    return saved


def same_pixels(saved: Picture, written: Picture) -> bool:
    """Whether a re-read file holds the pixels written, in the layout written."""
    pixels = in_layout_of(saved, written).pixels
    alpha_ok = (saved.alpha is None and written.alpha is None) or (
        saved.alpha is not None
        and written.alpha is not None
        and np.array_equal(saved.alpha, written.alpha)
    )
    return (
        alpha_ok and pixels.shape == written.pixels.shape and np.array_equal(pixels, written.pixels)
    )


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    return buf.getvalue()


def check_format(path: Path, fmt: str, mode: str) -> None:
    """Checks that format `fmt` stores a `mode` picture (L, LA, RGB, RGBA) exactly, by writing
    and re-reading random pixels; lossy formats need only write it. UADError if not."""
    if fmt in REFUSED_FORMATS:
        raise UADError(
            f"{path}: {fmt} cannot hold the image ({REFUSED_FORMATS[fmt]}); save as .png"
        )
    rng = np.random.default_rng(0)
    shape = (23, 37) if mode.startswith("L") else (23, 37, 3)
    probe = Picture(
        rng.integers(0, 256, shape, dtype=np.uint8),
        rng.integers(0, 256, shape[:2], dtype=np.uint8) if mode.endswith("A") else None,
    )
    what = {"L": "grey", "LA": "grey + alpha", "RGB": "RGB", "RGBA": "RGB + alpha"}[mode]
    try:
        data = encode(probe.to_pil(), fmt)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            back = to_picture(im)
    except Exception:  # PIL raises many kinds for a mode a format cannot take
        raise UADError(f"{path}: {fmt} cannot store {what} images; save as .png") from None
    if fmt not in LOSSY_FORMATS and not same_pixels(back, probe):
        raise UADError(
            f"{path}: {fmt} does not store {what} pixels exactly, so the perturbation would not "
            "survive; save as .png"
        )


def default_file_mode(path: Path) -> int:
    """The permissions a plain open(path, "w") would give: an existing file's, else 0666 less
    the umask."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def existing_ancestor(folder: Path) -> Path:
    """The folder itself if it exists, else its nearest existing ancestor."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(path, new_folder: bool = False) -> None:
    """Checks that a file can be written at `path`, by creating and removing a temporary file
    in its folder (os.access alone says yes to root and to read-only file systems). new_folder:
    the folder may be missing, to be created on writing; its nearest existing ancestor is
    checked. Raises UADError naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise UADError(f"{path}: is a folder")
    folder = existing_ancestor(path.parent) if new_folder else path.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise UADError(f"{path}: folder {folder} {problem}")
    if not os.access(folder, os.W_OK):
        raise UADError(f"{path}: cannot write to folder {folder}")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=f".{path.name}."):
            pass
    except OSError as e:
        raise UADError(f"{path}: cannot write to folder {folder} ({e.strerror or e})") from None


def write_atomically(path, data: bytes, verify=None) -> None:
    """Writes `path` whole or not at all: a temporary file in its folder, then `verify(tmp)` if
    given (it raises to refuse the file), then a rename into place with the permissions a plain
    save gives. On any failure nothing is left."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UADError(f"{path}: cannot write to folder {path.parent} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, default_file_mode(path))
        os.replace(tmp, path)
    except OSError as e:
        raise UADError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_destination(
    path, overwrite: bool = False, mode: Optional[str] = None, new_folder: bool = False
) -> str:
    """Checks that an image can be written at `path` (see check_writable) and, given a picture
    mode (L, LA, RGB, RGBA), that its format holds such a picture exactly. Returns the PIL
    format; raises UADError naming the problem."""
    path = Path(path)
    fmt = output_format(path)
    if path.exists() and not path.is_dir() and not overwrite:
        raise UADError(f"{path}: exists; pass --overwrite to replace it")
    check_writable(path, new_folder)
    if mode is not None:
        check_format(path, fmt, mode)
    return fmt


def write_image(path, picture, overwrite: bool = False, new_folder: bool = False) -> Picture:
    """Saves a Picture (or PIL image) to `path` atomically; returns what the file holds, re-read,
    in the layout written.

    The temporary file is re-read and checked before it is renamed into place: a lossless
    format must give back exactly the pixels written; a lossy one (JPEG) is only read.
    """
    path = Path(path)
    picture = to_picture(picture) if isinstance(picture, Image.Image) else picture
    fmt = check_destination(path, overwrite, new_folder=new_folder)
    if fmt == "JPEG" and picture.alpha is not None:
        raise UADError(f"{path}: JPEG cannot store the alpha channel; save as .png")
    saved = []

    def verify(tmp):
        saved.append(in_layout_of(read_image(tmp, max_pixels=None), picture))
        if fmt not in LOSSY_FORMATS and not same_pixels(saved[0], picture):
            raise UADError(f"{path}: {fmt} did not store the pixels exactly; nothing written")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UADError(f"{path}: cannot write to folder {path.parent} ({e.strerror})") from None
    try:
        data = encode(picture.to_pil(), fmt)
    except OSError as e:  # e.g. no memory for the encoder's buffers
        raise UADError(f"{path}: cannot write ({e.strerror or e})") from None
    write_atomically(path, data, verify)
    return saved[0]


# -----------------------------------------------------------------------------------------------
# Progress: one status line for both command lines


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """Status lines on stderr: redrawn in place on a terminal; in a log file, a line every 10%
    of a stage. `item` names the file being worked on (with an ETA over the files); calling the
    object reports a stage's steps (the attack's progress callback); `error` prints a message
    without breaking a redrawn line."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet, self.stream = quiet, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.prefix, self.open = "", False
        self.stage, self.started, self.shown = None, 0.0, -1
        self.items_started = time.monotonic()

    def item(self, index: int, total: int, name: str, count: int = 1) -> None:
        """Starts item `index` (0-based) of `total`, named `name`; or `count` items at once."""
        items = f"{index + 1}" if count == 1 else f"{index + 1}-{index + count}"
        self.prefix = f"[{items}/{total}] {name}" if total > 1 else name
        line = self.prefix
        if index == 0:  # the pace counts from the first item, not from loading the models
            self.items_started = time.monotonic()
        else:
            per_item = (time.monotonic() - self.items_started) / index
            line += f"  {per_item:.1f} s/image, ETA {format_duration(per_item * (total - index))}"
        self.stage = None
        self._show(line, final=not self.tty)

    def __call__(self, stage: str, step: int, total: int, loss: Optional[float] = None) -> None:
        now = time.monotonic()
        if stage != self.stage or step == 0:
            self.stage, self.started, self.shown = stage, now, -1
        if step == 0:
            return
        eta = (now - self.started) / step * (total - step)
        line = f"{self.prefix}: " if self.prefix else ""
        line += f"{stage} {step}/{total}" + (f" loss {loss:+.4f}" if loss is not None else "")
        line += f" eta {format_duration(eta)}"
        if self.tty:
            self._show(line, final=False)
        elif step == total or step * 10 // total > self.shown:
            self.shown = step * 10 // total
            self._show(line, final=True)

    def _show(self, line: str, final: bool) -> None:
        if self.quiet:
            return
        if self.tty:
            print(f"\r{line[:99]:<99}", end="", file=self.stream, flush=True)
            self.open = True
        elif final:
            print(line, file=self.stream, flush=True)

    def error(self, message: str) -> None:
        self.end()
        print(f"error: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.end()
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.open:
            print(file=self.stream, flush=True)
            self.open = False


# -----------------------------------------------------------------------------------------------
# Command line


@dataclass
class Job:
    src: Path
    dst: Path
    new_folder: bool = False  # dst's folder is the output folder, created on the first write
    fmt: str = ""  # PIL format of dst, from check_job
    frames: int = 1  # frames or pages of src, from check_job
    shape: tuple = ()  # (height, width, 2 if grey else 3): src's pixels, from check_job


def jobs_for(src: Path, dst: Path) -> List[Job]:
    """The jobs: one file, or every image file of a folder into another folder (made if new)."""
    if not src.is_dir():
        return [Job(src, dst / src.name if dst.is_dir() else dst)]
    exts = Image.registered_extensions()
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise UADError(f"{src}: no image files in this folder")
    if dst.exists() and not dst.is_dir():
        raise UADError(f"{dst}: input is a folder, so the output must be a folder too")
    if not dst.exists() and dst.suffix.lower() in exts:
        raise UADError(f"{dst}: input is a folder, so the output must be a folder, not a file name")
    return [Job(p, dst / p.name, new_folder=True) for p in files]


def check_job(job: Job, overwrite: bool, max_pixels: Optional[int]) -> None:
    """Everything about one job that can be known before the model loads: the input decodes,
    the output is not the input, its folder is writable and its format holds the result."""
    if job.dst.resolve() == job.src.resolve() and not overwrite:
        raise UADError(f"{job.dst}: output is the input file; pass --overwrite to replace it")
    picture = read_image(job.src, max_pixels)
    job.fmt = check_destination(job.dst, overwrite, picture.mode, job.new_folder)
    job.frames = picture.frames
    job.shape = (*picture.pixels.shape[:2], picture.pixels.ndim)


def check_surrogates(args, config: UADConfig) -> List[tuple]:
    """The surrogates to load, [(name, checkpoint or None), ...], from --surrogate or else
    --model-type and --checkpoint; their packages, checkpoint files and the blocks forming f
    (--layers, --stage-layers) checked against each one's depth, before any model loads."""
    if args.surrogate is not None and (args.model_type or args.checkpoint):
        raise UADError(
            "--surrogate replaces --model-type and --checkpoint: name each checkpoint as "
            "--surrogate NAME=PATH"
        )
    specs = args.surrogate or [(args.model_type or "vit_b", args.checkpoint)]
    for name, checkpoint in specs:
        import_family(name)
        if name in SURROGATE_STAGES:
            stages = SURROGATE_STAGES[name]
            check_layers(name, config, sum(stages), sum(stages[:2]), cli=True)
        else:
            check_layers(name, config, SAM_ARCHS[name]["depth"], cli=True)
        if checkpoint is not None:
            check_checkpoint_file(checkpoint)
    return specs


def check_model(args, config: UADConfig, device: torch.device) -> List[tuple]:
    """What can be known about the surrogates, the attack's inputs and the backends before
    anything loads; returns the surrogates to load (see check_surrogates)."""
    specs = check_surrogates(args, config)
    if (config.method == "aa") != (args.target_image is not None):
        raise UADError("--preset aa needs --target-image PATH, and only it takes one")
    if args.target_image is not None:
        read_image(args.target_image, args.max_pixels)
    if config.impl in ("cpp", "cuda"):
        wanted = "cpu" if config.impl == "cpp" else "cuda"
        if device.type != wanted:
            raise UADError(f"--impl {config.impl} runs on {wanted.upper()}, the device is {device}")
        if not warp_kernel.backends()[config.impl]:
            raise UADError(f"--impl {config.impl}: the warp_kernel extension is unavailable")
    return specs


def batches_of(jobs: List[Job], size: int) -> List[List[Job]]:
    """The jobs in batches of at most `size` images of one shape (Job.shape), in the order of
    their first job."""
    groups = {}
    for job in jobs:
        groups.setdefault(job.shape, []).append(job)
    batches = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
    order = {id(job): i for i, job in enumerate(jobs)}
    return sorted(batches, key=lambda batch: order[id(batch[0])])


def protect_files(jobs: List[Job], surrogates, config: UADConfig, args, progress: Progress) -> list:
    """Protects files of one shape as one batch: one attack on all of them, each image drawing
    from its own generator, so that every file is what protecting it alone gives. Returns each
    job's summary line, or the UADError that stopped it."""
    results, pictures = [None] * len(jobs), {}
    for i, job in enumerate(jobs):
        try:
            picture = read_image(job.src, args.max_pixels)
            if (*picture.pixels.shape[:2], picture.pixels.ndim) != job.shape:
                raise UADError(f"{job.src}: changed since it was checked")
            pictures[i] = picture
        except UADError as e:
            results[i] = e
    for i in pictures:
        job = jobs[i]
        if job.frames > 1:
            progress.warn(f"{job.src}: only the first of its {job.frames} frames is protected")
        if job.fmt in LOSSY_FORMATS:
            progress.warn(
                f"{job.dst}: {job.fmt} compression weakens the perturbation; "
                "the figures below are of the decoded file"
            )
    if not pictures:
        return results
    device = surrogates[0].device
    x = torch.cat([to_tensor(p.pixels, device) for p in pictures.values()])
    target = None
    if args.target_image is not None:
        target = to_tensor(read_image(args.target_image, args.max_pixels).pixels, device)
    adv, _, stats = attack(x, surrogates, config, progress, target)
    progress.end()
    seconds = f"{stats.seconds:.1f} s" + (f" for a batch of {len(x)}" if len(x) > 1 else "")
    for b, (i, picture) in enumerate(pictures.items()):
        job, image = jobs[i], x[b : b + 1]
        protected = quantize(adv[b : b + 1], image, config.eps)
        try:
            saved_picture = write_image(
                job.dst,
                dataclasses.replace(picture, pixels=to_pixels(protected)),
                args.overwrite,
                job.new_folder,
            )
        except UADError as e:
            results[i] = e
            continue
        saved = to_tensor(saved_picture.pixels, device)  # measure the file as saved
        with torch.no_grad():
            f = lambda v: [s.features(v, config) for s in surrogates]  # noqa: E731
            distance = feature_distance(f(saved), f(image)).clamp_min(0).item()
        linf = round((saved - image).abs().max().item() * 255)
        ssim = warp_kernel.ssim(saved.expand(-1, 3, -1, -1), image.expand(-1, 3, -1, -1)).item()
        results[i] = (
            f"{job.dst}: L-inf {linf}/255, PSNR {psnr(saved, image):.2f} dB, SSIM {ssim:.4f}, "
            f"feature distance {distance:.4f}, {seconds} ({args.preset} preset, "
            f"{surrogate_names(surrogates)})"
        )
    return results


def surrogate_names(surrogates) -> str:
    """How lines name the surrogates: "surrogate vit_b", "surrogates vit_b + sam2.1_t"."""
    return f"surrogate{'s' * (len(surrogates) > 1)} " + " + ".join(s.name for s in surrogates)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other input error
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def block_list(text: str) -> tuple:
    """--layers: comma-separated 0-based block indices."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated block indices, e.g. 3,4,5,6"
        ) from None


def surrogate_list(text: str) -> List[tuple]:
    """--surrogate: NAME[=CHECKPOINT][,NAME[=CHECKPOINT]...] -> [(name, path or None), ...]."""
    names = [n for n, spec in MODELS.items() if spec.family in SURROGATE_FAMILIES]
    specs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, equals, path = item.partition("=")
        if name == "hq_vit_tiny":
            raise argparse.ArgumentTypeError(
                f"{name}: Light HQ-SAM's encoder is a TinyViT of MobileSAM's architecture, "
                "whose surrogate is mobile_sam"
            )
        if name.startswith("hq_") and name in MODELS:
            raise argparse.ArgumentTypeError(
                f"{name}: SAM-HQ keeps SAM's image encoder frozen, so its surrogate is {name[3:]}"
            )
        if name == "fastsam":
            raise argparse.ArgumentTypeError(
                "fastsam: FastSAM is a YOLOv8 segmentation network with no SAM image encoder to "
                "attack; it is an evaluation target (eval.py --models fastsam)"
            )
        if name not in names:
            raise argparse.ArgumentTypeError(
                f"unknown surrogate {name!r}; choose from {', '.join(names)}"
            )
        if name in (n for n, _ in specs):
            raise argparse.ArgumentTypeError(f"{name} is named twice")
        if equals and not path:
            raise argparse.ArgumentTypeError(f"{item}: no checkpoint after '='")
        specs.append((name, Path(path) if path else None))
    if not specs:
        raise argparse.ArgumentTypeError("names no surrogate")
    return specs


def surrogate_names_help() -> str:
    """The --surrogate names by family: "vit_b, vit_l, vit_h (SAM); mobile_sam (MobileSAM); ..."."""
    families = {}
    for name, spec in MODELS.items():
        if spec.family in SURROGATE_FAMILIES:
            families.setdefault(spec.info.title, []).append(name)
    return "; ".join(f"{', '.join(names)} ({title})" for title, names in families.items())


def positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def model_type(text: str) -> str:
    if text not in SAM_ARCHS:
        raise argparse.ArgumentTypeError(
            f"unknown model type {text!r}; choose from {', '.join(SAM_ARCHS)}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="uad.py", description="Protect images against Segment Anything with UAD.")
    p.add_argument("input", type=Path, help="image file, or a folder of images")
    p.add_argument("output", type=Path, help="output file (format from its extension), or folder")
    p.add_argument(
        "--preset",
        default="paper",
        choices=[*PRESETS, *PRESET_ALIASES],
        help="paper (default): the live fidelity term, 242 encoder passes per image; "
        "no-fidelity: L_F and the proxy loop off, 42 passes; reference: old name of no-fidelity; "
        "baselines: aa (towards --target-image's features), noise (uniform noise)",
    )
    p.add_argument(
        "--model-type",
        default=None,
        type=model_type,
        metavar="{" + ",".join(SAM_ARCHS) + "}",
        help="surrogate SAM v1 (default vit_b)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="SAM weights (.pth); default: the official file in $UNSEGMENT_CACHE "
        "(~/.cache/unsegment), downloaded on first use",
    )
    p.add_argument(
        "--surrogate",
        type=surrogate_list,
        default=None,
        metavar="NAME[=PATH],..",
        help="the surrogate(s), instead of --model-type and --checkpoint; several form an "
        f"ensemble whose feature distances both stages average. NAME: {surrogate_names_help()}. "
        "SAM-HQ needs none of its own: it keeps SAM's encoder frozen, so vit_b/l/h attack it "
        "(hq_vit_tiny's is a TinyViT, as mobile_sam's). PATH: its checkpoint; without it, the "
        "official file in the cache, downloaded on first use",
    )
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help=f"refuse larger images, against decompression bombs [{MAX_PIXELS}]",
    )
    p.add_argument(
        "--target-image",
        type=Path,
        metavar="PATH",
        help="the other image whose features the aa baseline pulls towards (--preset aa only)",
    )
    p.add_argument("--quiet", action="store_true", help="no header, progress or warning lines")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--batch",
        type=positive_count,
        default=1,
        metavar="N",
        help="folder mode: attack up to N images of one size at once, each exactly as if alone "
        "(faster on a GPU) [1]",
    )
    group = p.add_argument_group("attack settings (defaults are the paper preset's)")
    for f in dataclasses.fields(UADConfig):
        flag = "--" + f.name.replace("_", "-")
        aliases = ["--input-noise"] if f.name == "encoder_noise" else []  # its old name
        unit, default, choices = f.metadata["unit"], f.default, f.metadata["choices"]
        if unit == 255:
            shown = f"in 1/255 [{default * unit:g}]"
        else:
            shown = f"[{','.join(map(str, default)) if isinstance(default, tuple) else default}]"
        helptext = f"{f.metadata['help']}" + ("" if f.type is bool else f" {shown}")
        if f.type is bool:
            group.add_argument(flag, action="store_true", default=None, help=helptext)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=block_list, default=None, metavar="I,J,..", help=helptext)
        else:
            metavar = None if choices else "N" if type(default) is int else "X"
            group.add_argument(
                flag,
                *aliases,
                type=type(default),
                default=None,
                choices=choices,
                metavar=metavar,
                help=helptext,
            )
    return p


def config_from_args(args) -> UADConfig:
    overrides = {}
    for f in dataclasses.fields(UADConfig):
        value = getattr(args, f.name)
        if value is not None:
            overrides[f.name] = value / f.metadata["unit"] if f.metadata["unit"] != 1 else value
    eps255 = overrides.get("eps", UADConfig.eps) * 255
    if not 0 < eps255 <= 64:
        raise UADError(f"--eps {eps255:g}: must be in (0, 64] (units of 1/255)")
    if eps255 < 1:
        raise UADError(
            f"--eps {eps255:g}: below one grey level; --eps counts 1/255ths "
            f"(--eps 8 is 8/255 = {8 / 255:.4f})"
        )
    if args.max_pixels < 1:
        raise UADError(f"--max-pixels {args.max_pixels}: must be positive")
    try:
        return preset_config(args.preset, **overrides)
    except UADError as e:  # name the flag, and its value in the flag's unit
        name, _, rest = str(e).partition(" ")
        f = {f.name: f for f in dataclasses.fields(UADConfig)}.get(name)
        if f is not None and f.metadata["unit"] == 255 and name in overrides:
            rest = f"{overrides[name] * 255:g}/255" + rest[rest.index(":") :]
        raise UADError(f"--{name.replace('_', '-')} {rest}") from None


def header(args, config: UADConfig, device: torch.device, jobs: List[Job], surrogates) -> str:
    """The line announcing the work, with what to expect on a CPU."""
    preset = PRESET_ALIASES.get(args.preset, args.preset)
    text = (
        f"unsegment: preset {args.preset}, eps {config.eps * 255:g}/255 ({config.eps:.4f}), "
        f"{config.deform_steps} deformation + {config.steps} PGD steps, "
        f"{surrogate_names(surrogates)} on {device}, seed {config.seed}, {len(jobs)} image(s)"
        + (f" in batches of up to {args.batch}" if args.batch > 1 and len(jobs) > 1 else "")
        + (f", the encoder sees {config.robust}" if config.robust else "")
        + (f", towards the features of {args.target_image}" if args.target_image else "")
    )
    if device.type == "cpu":
        gflops = sum(forward_gflops(s, config) for s in surrogates)
        minutes = cpu_estimate(config, gflops, torch.get_num_threads()) / 60
        forwards, backwards = encoder_passes(config)
        each = f" through each of the {len(surrogates)} surrogates" if len(surrogates) > 1 else ""
        text += (
            f"\nunsegment: on a CPU expect about {minutes:.0f} min per image ({forwards} encoder "
            f"forwards, {backwards} backwards{each}; a plain estimate for a 2-core AVX-512 "
            "machine)"
        )
        if preset == "paper":
            fast = cpu_estimate(
                preset_config("no-fidelity", dtype=config.dtype), gflops, torch.get_num_threads()
            )
            text += f"; --preset no-fidelity takes about {fast / 60:.0f} min, a CUDA GPU seconds"
        else:
            text += "; a CUDA GPU takes seconds"
        if config.dtype == "float32" and native_bfloat16():
            bf16 = dataclasses.replace(config, dtype="bfloat16")
            text += (
                f"; this CPU multiplies bfloat16 natively: --dtype bfloat16 takes about "
                f"{cpu_estimate(bf16, gflops, torch.get_num_threads()) / 60:.0f} min"
            )
    return text


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where --dtype
    bfloat16 runs the encoder about twice as fast (see README, "Encoder speed")."""
    try:  # Linux names the instruction sets in the CPU's flags; elsewhere assume not
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (already printed as one line), or --help
        return e.code
    progress = Progress(quiet=args.quiet)
    try:
        config = config_from_args(args)
        device = resolve_device(args.device)
        specs = check_model(args, config, device)
        jobs = jobs_for(args.input, args.output)
        failures = 0
        if len(jobs) == 1:  # a bad input or output fails before any model is loaded
            check_job(jobs[0], args.overwrite, args.max_pixels)
        else:
            for job in list(jobs):
                try:
                    check_job(job, args.overwrite, args.max_pixels)
                except UADError as e:
                    progress.error(str(e))
                    jobs.remove(job)
                    failures += 1
            if not jobs:
                raise UADError(f"{args.input}: none of its {failures} image(s) can be protected")
        surrogates = [
            Surrogate.of(load_model(name, checkpoint, device, quiet=args.quiet), name)
            for name, checkpoint in specs
        ]
    except UADError as e:
        progress.error(str(e))
        return 1
    if not args.quiet:
        print(header(args, config, device, jobs, surrogates), file=sys.stderr)
    order = {id(job): i for i, job in enumerate(jobs)}
    unchecked, done, shown, lines = failures, 0, 0, {}  # lines are printed in the jobs' order
    for batch in batches_of(jobs, args.batch):
        progress.item(done, len(jobs), ", ".join(job.src.name for job in batch), len(batch))
        try:
            results = protect_files(batch, surrogates, config, args, progress)
        except UADError as e:
            results = [e] * len(batch)
        except (torch.OutOfMemoryError, MemoryError):
            hint = "a smaller --batch" if len(batch) > 1 else "a smaller image"
            results = [
                UADError(f"{job.src}: out of memory on {device}; try {hint}") for job in batch
            ]
        progress.end()
        done += len(batch)
        lines.update((order[id(job)], result) for job, result in zip(batch, results))
        while shown in lines:
            result = lines.pop(shown)
            if isinstance(result, UADError):
                failures += 1
                progress.error(str(result))
            else:
                print(result, flush=True)
            shown += 1
    total = len(jobs) + unchecked
    if total > 1:
        print(f"{total - failures} protected, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
