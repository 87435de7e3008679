"""UAD: Unsegment Anything by Simulating Deformation (Lu, Yang, Wang, CVPR 2024).

Adds an imperceptible L-infinity perturbation to an image so that the Segment Anything family
fails to segment it, for any point or box prompt:

    import uad
    protected = uad.protect(image, sam)   # image: (B, C, H, W) float in [0, 1], or uint8 / PIL

Stage 1 (`deform`) optimises a flow field whose warp of the image is a structurally different
but natural-looking target whose encoder features stay reachable inside the budget. Stage 2
(`simulate`) runs L-infinity PGD pulling the image's encoder features towards the target's and
away from its own. `attack` runs both on a batch of tensors; `protect` takes tensors, arrays or
PIL images and returns the same kind, exactly within eps.

This file is the method and nothing else, in the order a reader needs it: the configuration,
stage 1, stage 2, `attack` and `protect`, then the surrogates (each SAM family's differentiable
preprocessing and encoder features) and the differentiable publishing of `robust`. It needs
torch, numpy, pillow and warp_kernel (the fused warp + SSIM op, with a pure-PyTorch fallback).
Loading checkpoints, image files and the command line live in the `unsegment` package:

    python uad.py in.png out.png --eps 8      # the command line (unsegment.cli)
"""

import dataclasses
import functools
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import warp_kernel

__all__ = [
    "UADConfig", "UADError", "PRESETS", "preset_config",  # configuration
    "deform", "simulate", "project", "attack", "add_noise", "AttackResult", "Stats", "quantize",
    "protect", "uint8_pixels", "to_tensor", "to_pixels",  # pixels as tensors and back
    "Surrogate", "ViTSurrogate", "HieraSurrogate", "TinyViTSurrogate", "SAM3Surrogate", "Ensemble",
    "encoder_features", "feature_distance", "encoder_passes", "jpeg", "resize_round_trip",
    "gaussian_blur", "gaussian_noise", "reduce_bits",
]  # fmt: skip


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


# How a SAM v1 ViT block's attention is computed, the same features from the same weights:
# "sam", segment_anything's own; "sdpa", F.scaled_dot_product_attention with the relative
# positions as extra channels; "sdpa-mask", as an additive mask (docs/performance.md).
ATTENTIONS = ("sam", "sdpa", "sdpa-mask")


@dataclass
class UADConfig:
    method: str = knob(
        "uad",
        "uad: both stages; aa: stage 2 towards another image's features; noise: uniform noise",
        choices=("uad", "aa", "noise"),
    )
    # budget and stage 2 (feature simulation); images are in [0, 1]
    eps: float = knob(8 / 255, "L-infinity budget", unit=255, above=0, at_most=64 / 255)
    alpha: float = knob(2 / 255, "PGD step size", unit=255, above=0, at_most=1)
    steps: int = knob(40, "PGD steps of stage 2", at_least=0)
    random_start: bool = knob(False, "start stage 2 from uniform noise in [-eps, eps]")
    momentum: float = knob(
        0.0, "MI-FGSM decay mu; 0 disables it (the reference's MI: 1)", at_least=0, at_most=100
    )
    encoder_noise: float = knob(
        0.0,
        "std of Gaussian noise on what the encoder sees (never on the output)",
        255,
        at_least=0,
        at_most=1,
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
    deform_lr: float = knob(
        10.0, "Adam learning rate, pixels at SAM's 1024 input scale", above=0, at_most=1024
    )
    num_flows: int = knob(4, "flow fields tiled into one mosaic flow (K)", at_least=1, at_most=16)
    control_points: int = knob(
        6, "each flow is a bicubic grid of P x P points", at_least=2, at_most=256
    )
    init_std: float = knob(
        0.1, "initial displacement std, in control-grid blocks", at_least=0, at_most=256
    )
    cell_size: float = knob(
        300.0, "side of a mosaic cell, pixels at the 1024 scale", above=0, at_most=1e6
    )
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
        0, "seed of every draw, mixed with each image's own values", at_least=0, at_most=2**64 - 1
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
            if isinstance(value, float) and not math.isfinite(value):
                raise UADError(f"{f.name} {value!r}: must be a finite number")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise UADError(f"{f.name} {value!r}: choose from {', '.join(meta['choices'])}")
            if meta["at_least"] is not None and not value >= meta["at_least"]:
                raise UADError(f"{f.name} {value!r}: must be at least {meta['at_least']}")
            if meta["above"] is not None and not value > meta["above"]:
                raise UADError(f"{f.name} {value!r}: must be above {meta['above']}")
            if meta["at_most"] is not None and not value <= meta["at_most"]:
                raise UADError(f"{f.name} {value!r}: must be at most {meta['at_most']}")
        parse_robust(self.robust)  # raises UADError for a bad spec
        for name in ("layers", "stage_layers"):
            blocks = getattr(self, name)
            if not blocks or min(blocks) < 0:
                raise UADError(
                    f"{name} {','.join(map(str, blocks))}: need one or more block indices >= 0"
                )

    @property
    def publishing(self) -> tuple:
        """`robust` parsed: ((kind, low, high), ...); parsed once per value (see parse_robust)."""
        return parse_robust(self.robust)


# `paper` optimises the deformation with the live fidelity term, as the paper states.
# `no-fidelity` is the same deformation with L_F off: no proxy loop, 42 encoder passes per
# image instead of 242. `reference` is its old name: the authors' code gets no fidelity gradient
# into the warp either, but it differs from this preset in its losses and warps (docs/method.md).
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


def deform(image, f_image, surrogate: "Ensemble", config: UADConfig, gen, progress=None):
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
        x = publish(x, config.publishing, gen)
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


def simulate(
    image, f_target, f_image, surrogate: "Ensemble", config: UADConfig, gen, progress=None
):
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
    stats: "Stats"


def attack(
    image: torch.Tensor, sam, config: UADConfig, progress=None, target_image=None
) -> AttackResult:
    """Both stages on a batch of images (B, C, H, W) in [0, 1]; everything returned detached.

    sam is the surrogate: a SAM-family model (SAM, SAM-HQ, MobileSAM, SAM 2, SAM 3), a Surrogate,
    or a list of them, an ensemble whose feature distances both stages average (see Surrogate).
    config.method "aa" needs target_image, (1 or B, C, H', W') in [0, 1]: stage 2 then pulls
    towards its features instead of a deformed target's; "noise" draws uniform noise only.
    progress, if given, is called as progress(stage, step, total, loss): with step 0 (and no
    loss) when a stage starts, then after each of its steps. Every image draws its random
    numbers from its own generator (see `generators`), so that what the attack does to an
    image does not depend on the other images of the batch.
    """
    surrogates = surrogates_of(sam)
    for s in surrogates:
        s.check(config)
    if (config.method == "aa") != (target_image is not None):
        raise UADError("the aa baseline, and only it, takes a target image")
    check_images(image)
    if target_image is not None:
        check_images(target_image, "target image")
    stats, start = Stats(), time.monotonic()
    surrogate = Ensemble(surrogates, config, stats)
    gen = generators(image, config.seed)
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
        target, adv = image, add_noise(image, config, gen)
    with torch.no_grad():
        # 1 - cosine can round to just below 0 for near-identical features
        distance = feature_distance(surrogate(adv), f_image).clamp_min(0)
    stats.forwards -= 1  # the final measurement is not part of the attack
    stats.feature_distance = distance.tolist()
    stats.seconds = time.monotonic() - start
    return AttackResult(adv, target, stats)


def generators(image: torch.Tensor, seed: int) -> list:
    """One CPU generator per image of (B, C, H, W), seeded with `seed` and a SHA-256 of the
    image's own values: two images draw different numbers, and an image draws the same ones
    in any batch, on any device."""
    values = (x.detach().float().cpu().numpy().tobytes() for x in image)
    digests = (hashlib.sha256(seed.to_bytes(8, "little") + v).digest() for v in values)
    return [torch.Generator().manual_seed(int.from_bytes(d[:8], "little")) for d in digests]


def add_noise(image: torch.Tensor, config: UADConfig, gen=None) -> torch.Tensor:
    """The noise baseline, which needs no surrogate: image (B, C, H, W) plus uniform noise in
    [-eps, eps], each image drawing from its generator in gen (default: as `attack` seeds them)."""
    gen = gen or generators(image, config.seed)
    noise = draws(gen, image.shape, uniform(config.eps))
    return project(image + noise.to(image.device), image, config.eps)


MIN_SIZE = 16  # the smallest side attacked: SSIM's 11 x 11 window, with room to warp


def check_images(x: torch.Tensor, what: str = "image") -> None:
    """UADError unless x (B, C, H, W) holds finite values in [0, 1] and is MIN_SIZE or larger."""
    h, w = x.shape[-2:]
    if min(h, w) < MIN_SIZE:
        raise UADError(f"{what} is {w}x{h}, at least {MIN_SIZE}x{MIN_SIZE} needed")
    if not torch.isfinite(x).all():
        raise UADError(f"{what} holds NaN or infinite values")
    low, high = x.min().item(), x.max().item()
    if low < 0 or high > 1:
        raise UADError(
            f"{what} values run from {low:.4g} to {high:.4g}, not within [0, 1] "
            "(uint8 values: divide by 255)"
        )


def cast_within(adv: torch.Tensor, image: torch.Tensor, eps: float) -> torch.Tensor:
    """adv (float32) in image's dtype and on its device, each value within eps of image's own
    (not of its float32 copy): projected in float64, cast, and any value the cast rounded past
    the budget moved by one step of the dtype towards the image."""
    ref = image.double()
    out = project(adv.to(image.device, torch.float64), ref, eps).to(image.dtype)
    for _ in range(4):
        over = (out.double() - ref).abs() > eps
        if not over.any():
            return out
        out = torch.where(over, torch.nextafter(out, image), out)
    return torch.where((out.double() - ref).abs() > eps, image, out)


def quantize(
    adv: torch.Tensor, image: torch.Tensor, eps: float, levels: Optional[int] = 255
) -> torch.Tensor:
    """Rounds adv onto the lattice of `levels` + 1 values (255: uint8, 65535: 16-bit) inside the
    budget; levels None keeps float values, each within eps of image's (cast_within).

    For an image on the lattice (k / levels), every pixel of the result is within
    floor(eps * levels) levels of it, so max |result - image| <= eps holds exactly.
    """
    if levels is None:
        return cast_within(adv, image, eps)
    k = math.floor(eps * levels + 1e-6)
    a, i = (adv * levels).round(), (image * levels).round()
    return torch.min(torch.max(a, i - k), i + k).clamp(0, levels) / levels


def protect(
    image, sam, *, config: Optional[UADConfig] = None, progress=None, stats=None, target=None
):
    """Protects an image against promptable segmentation with UAD.

    Args:
      image: one of
        - torch.Tensor (B, C, H, W) float in [0, 1], C = 3 (RGB) or 1 (grey), on any device;
        - np.ndarray (H, W, 3) or (H, W) uint8;
        - PIL.Image.Image (any mode; an alpha channel and an ICC profile are carried through).
      sam: the surrogate: a SAM-family model (a segment_anything Sam, a SAM-HQ, MobileSAM or
        SAM 2 model), a Surrogate, or a list of them (an ensemble, on one device). Nothing is
        loaded here: unsegment.models.load_sam("vit_b") loads (and on first use downloads) the
        paper's ViT-B.
      config: attack settings; None is the `paper` preset.
      progress: callable(stage, step, total, loss=None), e.g. unsegment.progress.Progress();
        None is silent.
      stats: a Stats to fill with what the attack did.
      target: the other image of the `aa` baseline, of the same kinds as `image`.

    Returns:
      The protected image, of the same kind as `image`: a tensor of its dtype, each value within
      eps of the input's in that dtype; or uint8 pixels / a PIL image rounded onto the lattice
      of its depth (8 bits; 16 for 16-bit grey; a float image stays float), exactly within eps.
      An image with values outside [0, 1], NaN, or a side under MIN_SIZE is a UADError.
    """
    config = config or UADConfig()
    lattice = not isinstance(image, torch.Tensor)
    if lattice and math.floor(config.eps * 255 + 1e-6) < 1:
        raise UADError(
            f"eps {config.eps:g} is below one grey level (1/255 = {1 / 255:.4f}): "
            "a uint8 image cannot change"
        )
    if sam is None:
        raise UADError(
            "protect needs the surrogate model: load one explicitly, e.g. "
            'unsegment.models.load_sam("vit_b") (downloads the official ViT-B on first use)'
        )
    surrogates = surrogates_of(sam)
    device = surrogates[0].device
    if target is not None:
        if isinstance(target, torch.Tensor):
            target = target.to(device, torch.float32)
        else:
            array = isinstance(target, np.ndarray)
            target = to_tensor(
                uint8_pixels(target) if array else pil_picture(target).pixels, device
            )
        target = target.expand(-1, 3, -1, -1)
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[1] not in (1, 3) or not image.is_floating_point():
            raise UADError(f"expected a float (B, 1 or 3, H, W) tensor, got {tuple(image.shape)}")
        adv, _, s = attack(image.to(device, torch.float32), surrogates, config, progress, target)
        result = cast_within(adv, image, config.eps)
    else:
        picture = None if isinstance(image, np.ndarray) else pil_picture(image)
        x = to_tensor(uint8_pixels(image) if picture is None else picture.pixels, device)
        levels = 255 if picture is None else LEVELS.get(picture.pixels.dtype)  # 16-bit, float
        adv, _, s = attack(x, surrogates, config, progress, target)
        pixels = to_pixels(quantize(adv, x, config.eps, levels), levels)
        result = pixels if picture is None else picture.to_pil(pixels)
    if stats is not None:
        vars(stats).update(vars(s))
    return result


# -----------------------------------------------------------------------------------------------
# Pixels (uint8; uint16 and float32 for 16-bit and float grey) as tensors and back


def uint8_pixels(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) or (H, W) array as it is ((H, W, 1) as (H, W)); UADError otherwise."""
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))
    ):
        raise UADError(
            f"expected a uint8 (H, W, 3) or (H, W) array, got {image.dtype} {image.shape}"
        )
    return image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image


def pil_picture(image):
    """A PIL image as unsegment.images.to_picture decodes it (its modes, alpha and colour
    profile); UADError for anything that is not an array or a PIL image."""
    if not type(image).__module__.startswith("PIL."):
        raise UADError(
            f"cannot protect a {type(image).__name__}; pass a tensor, array or PIL image"
        )
    try:
        from unsegment.images import to_picture
    except ImportError:
        raise UADError("PIL images need the unsegment package; pass np.asarray(image)") from None
    return to_picture(image)


LEVELS = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}  # a dtype's lattice; float: None


def to_tensor(pixels: np.ndarray, device="cpu") -> torch.Tensor:
    """(H, W, 3) or (H, W) pixels -> (1, C, H, W) float in [0, 1]: uint8 / 255, uint16 / 65535
    (16-bit grey), float32 as it is."""
    levels = LEVELS.get(pixels.dtype)
    if levels == 65535:  # torch has few uint16 ops; float32 holds every 16-bit value exactly
        pixels = pixels.astype(np.float32)
    t = torch.from_numpy(np.array(pixels)).to(device)  # a copy: PIL arrays are read-only
    t = t[..., None] if t.ndim == 2 else t
    return t.permute(2, 0, 1)[None].float() / (levels or 1)


def to_pixels(x: torch.Tensor, levels: Optional[int] = 255) -> np.ndarray:
    """(1, C, H, W) float on the lattice of `levels` -> (H, W, C) or (H, W) uint8 (255), uint16
    (65535), or float32 (None)."""
    a = x[0].float() if levels is None else (x[0] * levels).round().clamp(0, levels).int()
    a = a.permute(1, 2, 0).cpu().numpy()
    a = a if levels is None else a.astype(np.uint8 if levels == 255 else np.uint16)
    return a[..., 0] if a.shape[-1] == 1 else a


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


def sam2_input(x: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """SAM 2's preprocessing, differentiable: SAM2Transforms as SAM2ImagePredictor applies it
    (SAM 3's predictor too, with mean and std 0.5).

    Resizes to a size x size square, not keeping the aspect ratio (bilinear and antialiased, as
    torchvision's Resize does to a tensor), and normalises by `mean` and `std` on the [0, 1]
    scale. Nothing is padded or rounded.

    Args:
      x: (B, C, H, W) float in [0, 1], C = 3 (RGB) or 1 (grey, replicated to RGB).
      size: the model's image_size (1024 for every released SAM 2 and 2.1, 1008 for SAM 3).

    Returns:
      (B, 3, size, size) float.
    """
    x = F.interpolate(
        x.expand(-1, 3, -1, -1), (size, size), mode="bilinear", align_corners=False, antialias=True
    )
    mean, std = x.new_tensor(mean).view(3, 1, 1), x.new_tensor(std).view(3, 1, 1)
    return (x - mean) / std


def encoder_features(
    sam, x, layers: Sequence[int], dtype="float32", attention="sam", preprocessed=False
):
    """Outputs of the encoder blocks `layers` for images x (B, C, H, W) in [0, 1] (preprocessed:
    x is sam_input's (B, 3, S, S) already, as the authors' PGD perturbs it).

    Runs patch_embed, pos_embed and blocks[0 : max(layers) + 1] only: the later blocks and the
    neck do not influence the features and are never run. attention: see `run_block`. Returns a
    list of (B, 64, 64, width).
    """
    enc = sam.image_encoder
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        h = enc.patch_embed(x if preprocessed else sam_input(x, sam))  # (B, 64, 64, width)
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


def sam3_features(model, x: torch.Tensor, blocks: Sequence[int], dtype: str = "float32"):
    """Outputs of SAM 3's ViT blocks `blocks` for images x (B, C, H, W) in [0, 1].

    Runs what the package's ViT.forward runs before its blocks (patch_embed, the tiled absolute
    positions, ln_pre) and blocks[0 : max(blocks) + 1] only: the later blocks and the necks are
    never run. Returns a list of (B, S / 14, S / 14, width), S = model.image_size.
    """
    from sam3.model.vitdet import get_abs_pos

    vit = model.backbone.vision_backbone.trunk
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        h = vit.patch_embed(sam2_input(x, model.image_size, (0.5,) * 3, (0.5,) * 3))
        cls = vit.pretrain_use_cls_token, vit.retain_cls_token  # SAM 3: True, False
        h = h + get_abs_pos(vit.pos_embed, cls[0], h.shape[1:3], cls[1], tiling=vit.tile_abs_pos)
        h, feats = vit.ln_pre(h), []  # (B, S/14, S/14, width)
        for i, block in enumerate(vit.blocks[: max(blocks) + 1]):
            h = block(h)
            if i in blocks:
                feats.append(h.float())
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
        mobile_sam Sam, a sam2 SAM2Base, or a sam3 Sam3TrackerPredictor.
      name: how lines and errors name it (default: the family).
    """

    family = ""
    third_stage: Optional[int] = None  # first block of the third stage; None: a ViT
    encoder_has = ""  # the attribute of its image encoder that tells the family apart
    # the execution settings besides dtype whose non-default values its features honour
    # ("attention", "compile"); a family refuses the others by name rather than ignore them
    honours: tuple = ()

    def __init__(self, model, name: Optional[str] = None):
        self.model, self.name = model, name or self.family

    @staticmethod
    def of(model, name: Optional[str] = None) -> "Surrogate":
        """The Surrogate of `model`'s family (a Surrogate is returned as it is)."""
        if isinstance(model, Surrogate):
            return model
        encoder = getattr(model, "image_encoder", getattr(model, "backbone", None))  # SAM 3's
        for family in Surrogate.__subclasses__():  # every class below, each its own family
            if family.fits(encoder):
                return family(model, name)
        raise UADError(
            f"cannot use a {type(model).__name__} as a surrogate: expected a Segment Anything "
            "model (SAM, SAM-HQ, MobileSAM, SAM 2 or SAM 3)"
        )

    @classmethod
    def fits(cls, encoder) -> bool:
        """Whether a model with this image encoder is of the family."""
        return bool(cls.encoder_has) and hasattr(encoder, cls.encoder_has)

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
        """UADError unless the blocks and the execution settings `config` asks for fit."""
        check_layers(self.name, config, self.depth, self.third_stage)
        self.check_settings(self.name, config)

    @classmethod
    def check_settings(cls, name: str, config: UADConfig, cli: bool = False) -> None:
        """UADError naming the first setting of `config` that surrogate `name` (of this class)
        cannot honour; cli: the error names the flag."""
        asked = {"attention": config.attention != "sam", "compile": config.compile}
        for setting in (s for s, on in asked.items() if on and s not in cls.honours):
            label = f"--{setting}" if cli else setting
            value = f" {config.attention}" if setting == "attention" else ""
            raise UADError(
                f"{label}{value}: surrogate {name} ({cls.family}) runs its package's own blocks; "
                "only SAM v1 ViT surrogates take it"
            )

    def features(self, x: torch.Tensor, config: UADConfig) -> List[torch.Tensor]:
        """f(x): the outputs of blocks(config) for images x (B, C, H, W) in [0, 1]."""
        raise NotImplementedError


class ViTSurrogate(Surrogate):
    """SAM v1 (and SAM-HQ, which keeps SAM's encoder): a plain ViT at stride 16. Input:
    sam_input (longest side resized to the encoder's size and padded, 0-255 scale, the
    model's pixel mean and std). f: the outputs of blocks config.layers, by default the paper's
    blocks 4-7 of ViT-B (0-based 3..6), each (B, 64, 64, width)."""

    family = "SAM ViT"
    encoder_has = "blocks"

    honours = ("attention", "compile")

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

    Why those (the early-middle stretch at stride 16, as the paper's blocks 4-7 of ViT-B are):
    docs/models.md; --stage-layers chooses others.
    """

    family = "SAM 2 Hiera"
    encoder_has = "trunk"

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
    encoder_has = "layers"

    @property
    def third_stage(self) -> int:
        layers = self.model.image_encoder.layers
        return len(layers[0].blocks) + len(layers[1].blocks)

    @property
    def depth(self) -> int:
        return sum(len(stage.blocks) for stage in self.model.image_encoder.layers)

    def features(self, x, config):
        return tinyvit_features(self.model, x, self.blocks(config), config.dtype)


class SAM3Surrogate(Surrogate):
    """SAM 3 (its tracker, whose encoder is also its detector's): a plain ViT at patch 14 of 32
    blocks (24 x 24 windows, global attention in blocks 7, 15, 23, 31, 2-D rotary positions).
    Input: sam2_input with mean and std 0.5 (a square resize to image_size, 1008). f: the
    outputs of blocks config.layers, as for SAM v1's ViTs, each (B, 72, 72, 1024).

    Why those: its encoder has ViT-H's depth and global blocks, so --layers means the same blocks
    for both; the default, 3..6 (the paper's blocks 4-7), is the early stretch before the first
    global block and runs 7 of the 32 blocks (docs/models.md). --layers chooses others.
    """

    family = "SAM 3 ViT"
    encoder_has = "vision_backbone"

    @property
    def input_size(self) -> int:
        return self.model.image_size

    @property
    def depth(self) -> int:
        return len(self.model.backbone.vision_backbone.trunk.blocks)

    def features(self, x, config):
        return sam3_features(self.model, x, self.blocks(config), config.dtype)


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
# Publishing, differentiably (--robust): JPEG as PIL's libjpeg-turbo codes it, PIL's bicubic
# downscale and upscale, and three cheap purifiers: Gaussian blur, Gaussian noise, bit-depth
# reduction. Every rounding to integers is exact in the forward pass and the identity in the
# backward pass (straight-through), so gradients reach the image.

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
# allowed parameter ranges: JPEG quality, downscale factor, blur sigma in pixels, noise std in
# 1/255, bits per channel; jpeg and bits whole numbers with both ends allowed, the others above 0
ROBUST_RANGES = {"jpeg": (1, 100), "resize": (0.0, 1.0), "blur": (0.0, 20.0),
                 "noise": (0.0, 64.0), "bits": (1, 8)}  # fmt: skip


@functools.lru_cache(maxsize=None)
def parse_robust(spec: str) -> tuple:
    """Parses "jpeg:50-95,resize:0.5-1,none" into ((kind, low, high), ...); UADError if bad.
    Cached: a config's spec is parsed once, not at every PGD step."""
    items = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, values = item.partition(":")
        if kind == "none" and not values:
            items.append(("none", 0.0, 0.0))
            continue
        if kind not in ROBUST_RANGES or not values:
            raise UADError(
                f"robust {spec!r}: {item!r} is not jpeg:Q[-Q], resize:S[-S], blur:S[-S], "
                "noise:S[-S], bits:N[-N] or none"
            )
        try:
            low, _, high = values.partition("-")
            low, high = float(low), float(high or low)
        except ValueError:
            raise UADError(f"robust {spec!r}: {item!r} has no number range") from None
        if low > high:
            raise UADError(f"robust {spec!r}: {item!r} is reversed; write {kind}:{high:g}-{low:g}")
        bottom, top = ROBUST_RANGES[kind]
        whole = kind in ("jpeg", "bits")
        fits = bottom <= low <= high <= top if whole else bottom < low <= high <= top
        if not fits:
            raise UADError(f"robust {spec!r}: {kind} takes values in {bottom:g}..{top:g}")
        items.append((kind, low, high))
    return tuple(items)


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
        elif kind == "blur":
            image = gaussian_blur(image, value)
        elif kind == "noise":
            image = gaussian_noise(image, value / 255, g)
        elif kind == "bits":
            image = reduce_bits(image, round(value))
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


def gaussian_blur(x: torch.Tensor, sigma: float, rounding: bool = True) -> torch.Tensor:
    """Gaussian blur of std `sigma` pixels (taps to 3 sigma, edges replicated) to uint8:
    (B, C, H, W) in [0, 1]. PIL's GaussianBlur approximates the same Gaussian by box blurs."""
    r, c = math.ceil(3 * sigma), x.shape[1]
    taps = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(taps**2) / (2 * sigma**2))
    k = (k / k.sum()).expand(c, 1, -1)  # (C, 1, 2r + 1), one per channel
    x = F.pad(x * 255, (r, r, r, r), mode="replicate")
    x = F.conv2d(F.conv2d(x, k[..., None, :], groups=c), k[..., None], groups=c)
    return (straight_round(x) if rounding else x).clamp(0, 255) / 255


def gaussian_noise(x: torch.Tensor, std: float, gen, rounding: bool = True) -> torch.Tensor:
    """x plus Gaussian noise of std `std` (in [0, 1] units) drawn from the CPU generator gen,
    to uint8: (B, C, H, W) in [0, 1]."""
    x = x * 255 + std * 255 * torch.randn(x.shape, generator=gen).to(x)
    return (straight_round(x) if rounding else x).clamp(0, 255) / 255


def reduce_bits(x: torch.Tensor, bits: int, rounding: bool = True) -> torch.Tensor:
    """Bit-depth reduction as feature squeezing does it (Xu et al. 2018): each value to the
    nearest of 2^bits levels, written back as uint8: (B, C, H, W) in [0, 1]."""
    r, levels = (straight_round if rounding else (lambda t: t)), 2**bits - 1
    return r(r(x * levels) * (255 / levels)) / 255


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


def __getattr__(name):  # the names that moved to the unsegment package, forwarded with a warning
    try:
        from unsegment import moved  # imported only for a name uad does not have
    except ImportError:
        raise AttributeError(f"module 'uad' has no attribute {name!r}") from None
    return moved.forward("uad", name)


if __name__ == "__main__":
    import sys

    sys.modules.setdefault("uad", sys.modules[__name__])  # the CLI's `import uad` is this module
    try:
        from unsegment.cli import run
    except ImportError as e:
        sys.exit(
            f"error: uad.py's command line needs the unsegment package ({e.name or e} is "
            "missing): pip install -e . in its repository, or call uad.protect from Python"
        )
    sys.exit(run())
