"""What the tests and `python -m warp_kernel.check` share: random inputs, tolerances, one
training step of warp_ssim, and the CUDA kernels built for CPU threads.

    from warp_kernel import testing
    img, flow, ref, grad_warped = testing.make_inputs((2, 3, 23, 37), seed=1)
    testing.assert_close(got, want)  # tolerances follow want's dtype
"""

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
