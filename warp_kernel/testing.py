"""What the tests and `python -m warp_kernel.check` share: random inputs, tolerances, one
training step of warp_ssim, and the CUDA kernels built for CPU threads.

    from warp_kernel import testing
    img, flow, ref, grad_warped = testing.make_inputs((2, 3, 23, 37), seed=1)
    testing.assert_close(got, want)  # tolerances follow want's dtype
"""

import contextlib

import torch

import warp_kernel
from warp_kernel import build

# which of (img, flow, ref) require grad, and whether the loss uses `warped` too
GRAD_CASES = {
    "flow": ((False, True, False), False),  # uad.py's common case
    "flow+warped": ((False, True, False), True),
    "all": ((True, True, True), False),
    "all+warped": ((True, True, True), True),
    "img+warped": ((True, False, False), True),
}


def away_from_integers(flow):
    """The flow with its fractional parts squeezed into [0.05, 0.95]: the bilinear derivative
    jumps at integer sample positions, and grid_sample's normalise / unnormalise round trip
    moves a coordinate by an ulp, which could put it on the other side."""
    return flow.floor() + 0.05 + 0.9 * (flow - flow.floor())


def make_inputs(shape, seed=0, dtype=torch.float32, device="cpu", max_px=20.0):
    """[img, flow, ref, grad_warped] for images of `shape` (B, C, H, W), contiguous, all random.

    img is uniform in [0, 1]; ref half noise and half img shifted by one column, so that the
    SSIM is far from both 0 and 1; flow (B, 2, H, W) uniform in [-max_px, max_px] pixels, away
    from integer sample positions; grad_warped uniform in [-0.5, 0.5].
    """
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = shape
    img = torch.rand(shape, generator=g, dtype=torch.float64)
    ref = 0.5 * torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 * img.roll(1, -1)
    flow = (torch.rand(b, 2, h, w, generator=g, dtype=torch.float64) * 2 - 1) * max_px
    grad_warped = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    tensors = (img, away_from_integers(flow), ref, grad_warped)
    return [t.to(device=device, dtype=dtype).contiguous() for t in tensors]


# (rtol, atol as a fraction of the largest expected entry): entries that cancel to ~0 carry the
# rounding of their larger terms, so an absolute floor relative to the largest is needed.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def ssim_floor(dtype):
    """An absolute floor for SSIM values: they lie in [-1, 1], where near 0 a relative error
    means nothing."""
    return 0.0 if dtype == torch.float64 else 1e-6


def assert_close(actual, expected, floor=0.0):
    """Elementwise rtol, with an absolute floor: a fraction of the largest expected entry, or
    `floor`, whichever is larger (both by expected's dtype, see TOLERANCES)."""
    assert actual is not None and expected is not None, "a gradient is missing"
    rtol, scale = TOLERANCES[expected.dtype]
    atol = max(scale * float(expected.abs().max()), floor) + 1e-15
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_all_close(got, want, dtype, ssim_first=True):
    """assert_close over two lists of results; None (a gradient nobody asked for) must match.
    With ssim_first, the first entry is an SSIM value and gets ssim_floor."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"result {i}: a gradient nobody asked for was returned"
        else:
            assert_close(a, b, ssim_floor(dtype) if ssim_first and i == 0 else 0.0)


def converging_flow(b, h, w, x, y, device="cpu"):
    """(B, 2, H, W) float64 flow taking every pixel into [x, x + 0.9] x [y, y + 0.9]: each
    image's H * W samples share one top-left corner, whose run the four pixels there gather."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    jitter = torch.rand(b, 2, h, w, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    flow = torch.stack([x - xs, y - ys]).expand(b, 2, h, w) + 0.9 * jitter
    return flow.to(device)


def run_flow_warp(impl, img, flow, grad_out, padding):
    """(out, img.grad, flow.grad) of flow_warp, differentiated with the gradient grad_out."""
    i, f = img.detach().clone().requires_grad_(), flow.detach().clone().requires_grad_()
    out = warp_kernel.flow_warp(i, f, padding, impl=impl)
    out.backward(grad_out)
    return out.detach(), i.grad, f.grad


def run_ssim(impl, x, y):
    """(ssim, x.grad, y.grad) of the loss sum_b (b + 1) ssim[b]."""
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    s = warp_kernel.ssim(x, y, impl=impl)
    (s * torch.arange(1, s.numel() + 1, device=s.device, dtype=s.dtype)).sum().backward()
    return s.detach(), x.grad, y.grad


def run_warp_ssim(impl, img, flow, ref, padding, grad_warped, needs, use_warped):
    """One training step: (ssim, warped, img.grad, flow.grad, ref.grad) of the loss
    sum_b (b + 1) ssim[b] (+ sum(warped * grad_warped) if use_warped), where `needs` says which
    of img, flow, ref require grad."""
    img, flow, ref = (t.detach().clone().requires_grad_(n) for t, n in zip((img, flow, ref), needs))
    s, warped = warp_kernel.warp_ssim(img, flow, ref, padding=padding, impl=impl)
    loss = (s * torch.arange(1, s.numel() + 1, device=s.device, dtype=s.dtype)).sum()
    if use_warped:
        loss = loss + (warped * grad_warped).sum()
    loss.backward()
    return s.detach(), warped.detach(), img.grad, flow.grad, ref.grad


def assert_half_precision_is_float32(impl, dtype, device="cpu"):
    """float16 / bfloat16 inputs give what their float32 values give, rounded to their dtype,
    outputs and gradients alike."""
    img, flow, ref, grad_warped = make_inputs((2, 3, 20, 17), seed=11, dtype=dtype, device=device)
    got = run_warp_ssim(impl, img, flow, ref, "border", grad_warped, (True, True, True), True)
    f32 = [t.float() for t in (img, flow, ref, grad_warped)]
    want = run_warp_ssim(impl, *f32[:3], "border", f32[3], (True, True, True), True)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))
    x = img.clone().requires_grad_()
    s = warp_kernel.ssim(x, ref, impl=impl)
    s.sum().backward()
    assert s.dtype == x.grad.dtype == dtype
    assert torch.equal(s, warp_kernel.ssim(img.float(), ref.float(), impl=impl).to(dtype))


def load_cuda_emulation(verbose=False):
    """The CUDA kernels and their host-side code built for the CPU (one thread per CUDA thread;
    slow, small inputs only), with the same functions as the extensions but on CPU tensors.
    Raises if it cannot build."""
    cpp_extension = build._cpp_extension()
    with build._lock:
        if "emulation" not in build._modules:
            name = "warp_kernel_cuda_emulated"
            directory = build.build_root() / name
            directory.mkdir(parents=True, exist_ok=True)
            build._modules["emulation"] = cpp_extension.load(
                name=name,
                sources=[str(build.CSRC / "warp_ssim_emulated.cpp")],
                extra_include_paths=[str(build.CSRC)],
                extra_cflags=["-O1", "-pthread"],
                extra_ldflags=["-pthread"],
                build_directory=str(directory),
                verbose=verbose,
            )
        return build._modules["emulation"]


# ---------------------------------------------------------------------------------------------
# The emulation's block ranges, and images too large to compute whole
# ---------------------------------------------------------------------------------------------

TO_THE_END = 2**62  # a block range's stop past every grid


@contextlib.contextmanager
def only_blocks(emu, ranges):
    """Within the block, the emulated extension `emu` runs only blocks [start, stop) of every
    grid (by linear index; negative counts from the end; stop None: to the end)."""
    emu.set_block_ranges([(start, TO_THE_END if stop is None else stop) for start, stop in ranges])
    try:
        yield
    finally:
        emu.set_block_ranges([])


CORNER_TILES = 3  # the far corner: the last 3 x 3 tiles of the SSIM kernels


def corner_blocks(shape, tile=16):
    """Block ranges of the SSIM kernels' last CORNER_TILES rows and columns of tiles of a
    (1, C, H, W) image (tiles x fastest, then y): the bottom-right corner."""
    tiles_x = -(-shape[3] // tile)
    return [(-r * tiles_x - CORNER_TILES, -r * tiles_x if r else None) for r in range(CORNER_TILES)]


def far_corner_inputs(shape, dtype=torch.float32, device="cpu", seed=0, tile=16):
    """[img, flow, ref] of `shape` (1, C, H, W), left unwritten (so a huge CPU image costs no
    memory) except the pixels of the bottom-right corner and a 16-pixel margin: random, the
    flow within 2.25 pixels. Returns them and the (top, left) of the corner's first tile."""
    _, _, h, w = shape
    top, left = ((-(-n // tile) - CORNER_TILES) * tile for n in (h, w))
    assert top >= tile and left >= tile, f"{shape} is too small for a corner of tiles"
    img, ref = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
    flow = torch.empty((1, 2, h, w), dtype=dtype, device=device)
    crop_shape = (1, shape[1], h - top + tile, w - left + tile)
    crop = make_inputs(crop_shape, seed=seed, dtype=dtype, device=device, max_px=2.0)
    # Fractions of 1/4 or 3/4: x + flow is exact in float32 up to x = 2^22, as it is for the
    # small coordinates of the crop (elsewhere a float32 coordinate at 26800 moves by 0.002 px).
    crop[1] = (crop[1] * 2).floor() / 2 + 0.25
    for full, part in zip((img, flow, ref), crop):
        full[..., top - tile :, left - tile :] = part
    return [img, flow, ref], (top, left)


def assert_far_corner_matches(ext, shape, device="cpu", padding=0):
    """ext.warp_ssim_forward's gradients of flow and ref (per unit of grad_ssim) against the
    pure-PyTorch op on the corner crop of far_corner_inputs: the SSIM is an average of local
    windows, so at pixels 5 px inside the corner's tiles the gradient is the crop's, rescaled by
    the ratio of the window counts. Gradients of both flow and ref take four partial maps, whose
    offsets pass 2^31 for a (1, 1, 26800, 26800) image."""
    (img, flow, ref), (top, left) = far_corner_inputs(shape, device=device)
    _, _, grad_flow, grad_ref = ext.warp_ssim_forward(img, flow, ref, padding, 1.0, 0, 1, 1)[1:]
    # The reference in float64, on the crop's float32 values, so that only the kernel rounds.
    crop = [t[..., top - 16 :, left - 16 :].double().requires_grad_() for t in (img, flow, ref)]
    s, _ = warp_kernel.warp_ssim(*crop, ("border", "reflection")[padding], impl="torch")
    s.sum().backward()
    h, w = shape[-2:]
    hc, wc = crop[0].shape[-2:]
    scale = (hc - 10) * (wc - 10) / ((h - 10) * (w - 10))
    inner = (..., slice(top + 5, None), slice(left + 5, None))
    inner_crop = (..., slice(16 + 5, None), slice(16 + 5, None))
    assert_close(grad_flow[inner], (crop[1].grad[inner_crop] * scale).to(img.dtype))
    assert_close(grad_ref[inner], (crop[2].grad[inner_crop] * scale).to(img.dtype))
