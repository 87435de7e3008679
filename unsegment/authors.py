"""The `authors` attack: the target as the authors' code builds it, then UAD's stage 2.

The authors' code (github.com/jiahaolu97/anything-unsegmentable: attack/attacker.py `UAD`,
attack/tps.py, attack/deformer.py) builds its target differently from the paper and from
uad.py's stage 1. This module follows that computation, so that the paper's numbers, the
authors' computation and the `paper` preset can be compared on the same images:

- 4 warps, each an order-1 polyharmonic spline through 6 x 6 control points: the source points
  start at the centres of a 6 x 6 grid of blocks of int(1024 / 6) = 170 px, the destination
  points at the sources plus Gaussian noise of std 0.1 block, both optimised and clamped to the
  1024 x 1024 square after every step;
- merged per channel: the maximum of the 4 warped images where a checkerboard of 300 px cells,
  warped once by the first warp's initial points, is 1, the minimum where it is 0;
- loss: -mean |I - I_hat| on SAM's normalised, padded input (L1), plus 0.05 x their control
  loss, the mean within-warp std of the point displacements minus 0.5 x their mean std across
  the warps; sampling outside the image by reflection;
- 40 Adam steps at lr 10 (pixels at the 1024 scale), the target being the warp before the last
  step (their last step's update comes after the target's features are taken);
- then stage 2 as uad.py runs it (`uad.simulate`): 40 PGD steps of 2/255 within 8/255 on
  d(f(x), f(target)) - d(f(x), f(image)), d = 1 - cosine of encoder blocks 4-7.

Their sampler's bugs are not copied: here the flow's x and y are not swapped, and the warp
samples exactly where the spline says (warp_kernel.flow_warp; zero displacement is the
identity). Everything runs at the image's own resolution, the control points living at SAM's
1024 scale as theirs do (the splines are evaluated on that scale's grid), and the perturbation
is released exactly within eps at the original resolution (uad.quantize), not truncated at 1024
and resized. docs/reproduce.md ("The `authors` attack") lists what still differs from their code.

    import uad
    from unsegment import authors
    from unsegment.images import read_image
    from unsegment.models import load_sam
    from unsegment.progress import Progress

    sam = load_sam("vit_b", "sam_vit_b_01ec64.pth", device="cuda")
    config = authors.authors_config()       # uad.UADConfig; overrides as keywords
    x = uad.to_tensor(read_image("in.jpg").pixels, "cuda")   # (1, C, H, W) in [0, 1]
    result = authors.attack(x, sam, config, progress=Progress())
    protected = uad.quantize(result.adv, x, config.eps)          # exactly within eps
"""

import dataclasses
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import uad
import warp_kernel

# Their control loss weighs the spread across warps by 0.5 (Deformer.control_loss's
# translation_lambda): rewarding warps that move differently from one another.
ACROSS_WEIGHT = 0.5

# The UADConfig fields that differ from the paper preset. Stage 1 reads deform_steps,
# deform_lr, num_flows (the warps), control_points, init_std (destination noise, in blocks),
# cell_size (the checkerboard's cells), lambda_c and padding; lambda_tv, lambda_var, lambda_f
# and proxy_steps are not used (their fidelity term changes nothing, see docs/method.md).
OVERRIDES = {"padding": "reflection", "lambda_f": 0.0, "proxy_steps": 0}


def authors_config(**overrides) -> uad.UADConfig:
    """The settings of the authors' code as a uad.UADConfig, with fields overridden."""
    return uad.UADConfig(**{**OVERRIDES, **overrides})


def encoder_passes(config: uad.UADConfig) -> tuple:
    """(forwards, backwards) of the encoder per batch: f(image), f(target), the PGD steps."""
    return 2 + config.steps, config.steps


# -----------------------------------------------------------------------------------------------
# Order-1 polyharmonic splines (the thin-plate family's r^1 member): points are (x, y)


def fit_spline(centres: torch.Tensor, values: torch.Tensor):
    """The spline s(q) = sum_i w_i |q - c_i| + v^T (q, 1) with s(c_i) = values_i.

    With the side conditions sum_i w_i = 0 and sum_i w_i c_i = 0 the system has one solution
    for distinct centres. It is solved in float64 on the CPU (a (n + 3)-square system); if two
    centres coincide (points clamped into the same corner), by least squares.

    Args:
      centres: (N, n, 2) the interpolation centres.
      values: (N, n, k) the values at the centres.

    Returns:
      (w (N, n, k), v (N, 3, k)), in the dtype and on the device of `values`, differentiable.
    """
    c, f = centres.cpu().double(), values.cpu().double()
    batch, n, k = f.shape
    a = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist")  # (N, n, n)
    b = torch.cat([c, torch.ones(batch, n, 1, dtype=c.dtype)], 2)  # (N, n, 3)
    lhs = torch.cat(
        [torch.cat([a, b], 2), torch.cat([b.transpose(1, 2), b.new_zeros(batch, 3, 3)], 2)], 1
    )
    rhs = torch.cat([f, f.new_zeros(batch, 3, k)], 1)
    x, info = torch.linalg.solve_ex(lhs, rhs)  # (N, n + 3, k)
    # LU flags an exactly singular system only when a pivot comes out exactly zero: with two
    # centres on one point it often does not, and returns weights of 1e30
    diagonal = torch.eye(n, dtype=torch.bool)
    repeated = a.masked_fill(diagonal, torch.inf).flatten(1).amin(1) == 0  # (N,)
    fallback = (info != 0) | repeated
    if fallback.any():
        x = x.clone()
        x[fallback] = torch.linalg.pinv(lhs[fallback]) @ rhs[fallback]
    x = x.to(values.device, values.dtype)
    return x[:, :n], x[:, n:]


def distances(query: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(m, n) distances between points (m, 2) and (n, 2)."""
    # exact differences, not |q|^2 - 2 q.c + |c|^2, which cancels badly at 1024-pixel scales
    return torch.cdist(query, centres, compute_mode="donot_use_mm_for_euclid_dist")


class RadialTerm(torch.autograd.Function):
    """|q - c| @ w for query points q (m, 2), centres c (n, 2) and weights w (n, k): (m, k).

    The (m, n) distances are not kept for the backward pass but recomputed there a block of
    rows at a time, and only the centres' and the weights' gradients are formed: at an image's
    million pixels this is several times faster than autograd through cdist, in a fraction of
    the memory. The query points get no gradient.
    """

    ROWS = 1 << 16  # query points per block

    @staticmethod
    def forward(ctx, query, centres, w):
        ctx.save_for_backward(query, centres, w)
        return torch.cat([distances(q, centres) @ w for q in query.split(RadialTerm.ROWS)])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, centres, w = ctx.saved_tensors
        grad_centres, grad_w = torch.zeros_like(centres), torch.zeros_like(w)
        for q, g in zip(query.split(RadialTerm.ROWS), grad.split(RadialTerm.ROWS)):
            r = distances(q, centres)  # (rows, n)
            grad_w += r.T @ g
            # d|q - c| / dc = (c - q) / |q - c|, taken as 0 where q = c
            s = torch.where(r > 0, (g @ w.T) / r, torch.zeros_like(r))  # (rows, n)
            grad_centres += centres * s.sum(0)[:, None] - s.T @ q
        return None, grad_centres, grad_w


def eval_spline(query: torch.Tensor, centres: torch.Tensor, w, v) -> torch.Tensor:
    """The spline of `fit_spline` at query points (N, m, 2): (N, m, k)."""
    radial = torch.stack([RadialTerm.apply(*args) for args in zip(query, centres, w)])
    return radial + query @ v[:, :2] + v[:, 2:]


def pixel_centres(h: int, w: int, scale_x: float, scale_y: float, device) -> torch.Tensor:
    """(H * W, 2) positions (x, y) of an H x W image's pixel centres on a grid scale_x (scale_y)
    times as wide (high): with align_corners=False resizing, pixel i of the image lies at
    (i + 0.5) * scale - 0.5 of the resized one, whose pixels sit at integers as their grid's do."""
    ys = (torch.arange(h, device=device) + 0.5) * scale_y - 0.5
    xs = (torch.arange(w, device=device) + 0.5) * scale_x - 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], -1).view(-1, 2)


def spline_flow(source: torch.Tensor, dest: torch.Tensor, h: int, w: int, scale: float):
    """The flow of the warp that moves each source point's content to its destination point.

    The output pixel at a destination point samples the image at its source point; between
    them the displacement is the order-1 spline through the destination points. It is
    evaluated at each pixel's position at the control points' scale; for an image larger than
    that (scale < 1), on the pixels of the image resized to that scale, as theirs is, and then
    resized bilinearly to (H, W), which costs 1 / scale^2 times less.

    Args:
      source, dest: (N, n, 2) points (x, y), in pixels of the image scaled by `scale` (1024 /
        the longest side: SAM's input scale, where the control points live).
      h, w: the image's size.

    Returns:
      (N, 2, H, W) flow in image pixels, channel 0 = x, for warp_kernel.flow_warp (which
      samples pixel p at p + flow(p)).
    """
    n = len(source)
    weights = fit_spline(dest, source - dest)
    gh, gw = (h, w) if scale >= 1 else (max(1, round(h * scale)), max(1, round(w * scale)))
    query = pixel_centres(gh, gw, w * scale / gw, h * scale / gh, dest.device)
    flow = eval_spline(query.expand(n, -1, -1), dest, *weights) / scale  # (N, gh * gw, 2)
    flow = flow.transpose(1, 2).reshape(n, 2, gh, gw)  # image pixels
    if (gh, gw) != (h, w):
        flow = F.interpolate(flow, (h, w), mode="bilinear", align_corners=False)
    return flow


# -----------------------------------------------------------------------------------------------
# The merge of the warps, the control loss, stage 1


def merge(warped: torch.Tensor, keep_max: torch.Tensor) -> torch.Tensor:
    """Per channel and pixel, the maximum of the K warped images where keep_max is 1 and the
    minimum where it is 0, blended linearly in between.

    Args:
      warped: (B, K, C, H, W) the K warps of each image.
      keep_max: (B, 1, H, W) in [0, 1].

    Returns:
      (B, C, H, W).
    """
    return warped.max(1).values * keep_max + warped.min(1).values * (1 - keep_max)


def checkerboard(h: int, w: int, config: uad.UADConfig, device) -> torch.Tensor:
    """(1, 1, H, W) 1 on the cells of a checkerboard of config.cell_size pixels (at the 1024
    scale) whose row and column indices differ in parity, 0 on the others, as their filter."""
    cells = uad.mosaic_cells(h, w, dataclasses.replace(config, num_flows=2), device)
    return cells[:, 1]  # the one-hot channel of cell (i, j) with (i + j) odd


def control_loss(source: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Their control loss of each image's K warps of n points (B, K, n, 2): (B,).

    The std over the n points of each warp's displacements (per axis), averaged, minus
    ACROSS_WEIGHT x the std over the K warps of each point's displacement, averaged: each warp
    should move its points alike (a near-translation), and the warps unlike one another.
    """
    move = dest - source
    within = move.std(dim=2).mean((1, 2))
    if move.shape[1] == 1:
        return within
    return within - ACROSS_WEIGHT * move.std(dim=1).mean((1, 2))


class Target(NamedTuple):
    target: torch.Tensor  # (B, C, H, W) in [0, 1]: the merged warps
    ssim: torch.Tensor  # (B,) SSIM(target, image)
    source: torch.Tensor  # (B, K, n, 2) the control points it was made with, 1024-scale (x, y)
    dest: torch.Tensor  # (B, K, n, 2)


def warp_target(image, source, dest, keep_max, config: uad.UADConfig, scale: float):
    """The merged warps of images (B, C, H, W) by K splines each: (B, C, H, W)."""
    b, c, h, w = image.shape
    k = source.shape[1]
    flow = spline_flow(source.flatten(0, 1), dest.flatten(0, 1), h, w, scale)  # (B * K, 2, H, W)
    warped = warp_kernel.flow_warp(
        image.repeat_interleave(k, 0), flow, config.padding, impl=config.impl
    )
    return merge(warped.view(b, k, c, h, w), keep_max)


def deform(image: torch.Tensor, sam, config: uad.UADConfig, gen, progress=None) -> Target:
    """Stage 1 as the authors' code computes it (see the module docstring).

    Args:
      image: (B, C, H, W) in [0, 1].
      sam: the surrogate: the L1 loss is measured on its preprocessing (uad.sam_input); the
        control points live at the 1024 scale whatever its input size.
      gen: the CPU generator(s) of the destination points' noise (see uad.per_image).

    Returns:
      Target, detached.
    """
    b, _, h, w = image.shape
    # their points live on SAM's 1024 x 1024 input whatever the surrogate's input size, so that
    # deform_lr and init_std mean what they mean there (on a 128-input surrogate they once moved
    # the points 8 times further across the image)
    size = 1024
    scale = size / max(h, w)  # 1024-scale pixels per image pixel
    p, k = config.control_points, config.num_flows
    block = size // p
    centres = [int((i + 0.5) * block) for i in range(p)]
    grid_y, grid_x = torch.meshgrid(torch.tensor(centres), torch.tensor(centres), indexing="ij")
    source = torch.stack([grid_x, grid_y], -1).view(1, 1, p * p, 2).float().repeat(b, k, 1, 1)
    noise = config.init_std * block * uad.draws(gen, source.shape, torch.randn)
    dest = (source + noise).clamp(0, size - 1)
    source, dest = (t.to(image.device).requires_grad_(True) for t in (source, dest))
    with torch.no_grad():
        # the checkerboard is warped once, by the first warp's initial points
        first = spline_flow(source[:, 0], dest[:, 0], h, w, scale)  # (B, 2, H, W)
        board = checkerboard(h, w, config, image.device).expand(b, -1, -1, -1)
        keep_max = warp_kernel.flow_warp(board, first, config.padding, impl=config.impl)
        reference = uad.sam_input(image, sam)  # (B, 3, 1024, 1024) what L1 compares with
    optimizer = torch.optim.Adam([source, dest], lr=config.deform_lr)
    # their last step moves the points after the target's features are taken: T - 1 count
    updates = max(config.deform_steps - 1, 0)
    if progress:
        progress("deform", 0, updates)
    for step in range(updates):
        target = warp_target(image, source, dest, keep_max, config, scale)
        l1 = (uad.sam_input(target, sam) - reference).abs().mean((1, 2, 3))
        loss = -l1 + config.lambda_c * control_loss(source, dest)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            source.clamp_(0, size - 1)
            dest.clamp_(0, size - 1)
        if progress:
            progress("deform", step + 1, updates, loss.mean().item())
    with torch.no_grad():
        target = warp_target(image, source, dest, keep_max, config, scale)
        ssim = warp_kernel.ssim(target.expand(-1, 3, -1, -1), image.expand(-1, 3, -1, -1))
    return Target(target, ssim, source.detach(), dest.detach())


def attack(image: torch.Tensor, sam, config=None, progress=None) -> uad.AttackResult:
    """The `authors` attack on a batch of images (B, C, H, W) in [0, 1]: their stage 1, then
    uad.py's stage 2. Returns uad.AttackResult(adv, target, stats), detached; adv is within eps
    of the image but not yet on the uint8 lattice (uad.quantize puts it there).

    config: a uad.UADConfig (None: authors_config()); progress as for uad.attack.
    """
    config = config or authors_config()
    vit = uad.Surrogate.of(sam)
    if not isinstance(vit, uad.ViTSurrogate):
        raise uad.UADError("the authors' attack takes a SAM (ViT) surrogate, as their code does")
    vit.check(config)
    stats, start = uad.Stats(), time.monotonic()
    surrogate = uad.Ensemble([vit], config, stats)
    # one generator per image, as uad.attack makes them: an image draws the same numbers
    # whatever batch it is in
    gen = uad.generators(image, config.seed)
    with torch.no_grad():
        f_image = surrogate(image)
    target, target_ssim, _, _ = deform(image, sam, config, gen, progress)
    with torch.no_grad():
        f_target = surrogate(target)
    adv = uad.simulate(image, f_target, f_image, surrogate, config, gen, progress)
    with torch.no_grad():
        distance = uad.feature_distance(surrogate(adv), f_image).clamp_min(0)
    stats.forwards -= 1  # the final measurement is not part of the attack
    stats.target_ssim = target_ssim.tolist()
    stats.feature_distance = distance.tolist()
    stats.seconds = time.monotonic() - start
    return uad.AttackResult(adv, target, stats)


# -----------------------------------------------------------------------------------------------
# For reproduction only (benchmarks/reproduce.py): their AA's distance, and their release, which
# breaks the eps promise: PGD on SAM's padded, normalised input, truncated to uint8 at that scale
# and resized back (attack/attacker.py's PGD loops and get_cv2_from_torch)

DISTANCES = ("cosine", "l2")  # stage 2's 1 - cosine; their AA's L2 norm of the difference


def l2_distance(fa: list, fb: list) -> torch.Tensor:
    """Their AA's distance: the L2 norm of the difference of all the blocks' features of each
    image, as torch.norm over the stacked blocks: (B,); an ensemble's, the mean over it."""
    if isinstance(fa[0], list):
        return torch.stack([l2_distance(a, b) for a, b in zip(fa, fb)]).mean(0)
    return torch.stack([(a - b).flatten(1).pow(2).sum(1) for a, b in zip(fa, fb)]).sum(0).sqrt()


def simulate(image, f_target, f_image, sam, surrogate, config, distance="cosine", padded=False):
    """Stage 2 with the authors' choices: `distance` (see DISTANCES) in the objective, and with
    `padded` PGD on SAM's padded, normalised input as theirs runs it: steps of alpha and the
    budget eps per channel in that space (x 255 / pixel_std), clamped to the values a pixel can
    take, the padding perturbed too.

    Args:
      image: (B, C, H, W) in [0, 1]; f_target, f_image: the surrogate's features (f_image None:
        the aa baseline, towards f_target only).
      sam: the SAM (ViT) model; surrogate: a uad.Ensemble of it, which counts the passes.

    Returns:
      padded: (B, 3, S, S), the input the encoder sees (see `release`); else (B, C, H, W) in
      [0, 1] within eps of the image, as uad.simulate.
    """
    measure = uad.feature_distance if distance == "cosine" else l2_distance
    if padded:
        mean, std = sam.pixel_mean, sam.pixel_std  # (3, 1, 1), on the 0..255 scale
        start = uad.sam_input(image, sam).detach()  # (B, 3, S, S)
        low = torch.max(start - config.eps * 255 / std, -mean / std)
        high = torch.min(start + config.eps * 255 / std, (255 - mean) / std)
        step = config.alpha * 255 / std
        blocks = uad.Surrogate.of(sam).blocks(config)

        def features(z):
            surrogate.stats.forwards += 1
            surrogate.stats.backwards += 1
            args = (blocks, config.dtype, config.attention)
            return [uad.encoder_features(sam, z, *args, preprocessed=True)]

    else:
        start, step = image, config.alpha
        low, high = (image - config.eps).clamp(0, 1), (image + config.eps).clamp(0, 1)
        features = lambda x: surrogate(x, backward_passes=1)  # noqa: E731
    x, momentum = start.clone(), torch.zeros_like(start)
    for _ in range(config.steps):
        x.requires_grad_(True)
        f_x = features(x)
        loss = measure(f_x, f_target)
        if f_image is not None:
            loss = loss - measure(f_x, f_image)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        if config.momentum > 0:  # MI-FGSM, as uad.pgd_step
            norm = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            grad = momentum.mul_(config.momentum).add_(grad / norm)
        x = torch.min(torch.max(x.detach() - step * grad.sign(), low), high)
    return x


def release(z: torch.Tensor, sam, size) -> np.ndarray:
    """Their release of the padded, normalised input z (1, 3, S, S) (get_cv2_from_torch): the
    resized image cropped out of the padding, the normalisation undone, truncated to uint8 and
    resized back to size (H, W) by OpenCV's bilinear resize. (H, W, 3) uint8, NOT within eps."""
    import cv2  # opencv-python: what their code resizes with

    h, w = size
    scale = sam.image_encoder.img_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)  # as uad.sam_input
    pixels = (z[0, :, :nh, :nw] * sam.pixel_std + sam.pixel_mean).clamp(0, 255)
    pixels = pixels.permute(1, 2, 0).detach().cpu().numpy().astype(np.uint8)  # truncation
    return cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR)


def reproduction_attack(
    image, sam, config, target_image=None, stage1="authors", distance="cosine", padded=False
) -> uad.AttackResult:
    """An attack with the authors' choices, for reproduction: the target (the aa baseline's
    target image, else stage 1: their `deform` with stage1 "authors", uad.deform otherwise), then
    `simulate` with `distance` and `padded`. AttackResult.adv is what `simulate` returns: with
    padded, the padded, normalised input, for `release`."""
    vit = uad.Surrogate.of(sam)
    if not isinstance(vit, uad.ViTSurrogate):
        raise uad.UADError("the authors' release takes a SAM (ViT) surrogate, as their code does")
    vit.check(config)
    stats, start = uad.Stats(), time.monotonic()
    surrogate = uad.Ensemble([vit], config, stats)
    gen = uad.generators(image, config.seed)
    with torch.no_grad():
        f_image = surrogate(image)
    if config.method == "aa":
        target = target_image.to(image)
    elif stage1 == "authors":
        target = deform(image, sam, config, gen).target
    else:
        target = uad.deform(image, f_image, surrogate, config, gen).target
    with torch.no_grad():
        f_target = uad.each_feature(lambda f: f.expand(len(image), *f.shape[1:]), surrogate(target))
    towards_only = config.method == "aa"
    adv = simulate(
        image, f_target, None if towards_only else f_image, sam, surrogate, config, distance, padded
    )
    stats.seconds = time.monotonic() - start
    return uad.AttackResult(adv, target, stats)
