"""The self-check of the CUDA kernels: each op, on its first call per dtype and device in a
process, against the pure-PyTorch op on a small input.

The tests run the CUDA kernels on CPU threads only (warp_kernel.testing.load_cuda_emulation) and
`python -m warp_kernel.check` has not yet run on a GPU, so until it has, a kernel proves itself
where it is used: it runs once on two 16 x 19 images, with a smooth random flow of a few pixels,
in the dtype and on the device of the call, and its values and the gradients the attack uses must
match the reference's at the test suite's tolerances (warp_kernel.testing.TOLERANCES):

    flow_warp  the warped image, d/d img and d/d flow (both paddings)
    ssim       the SSIM and d/d x
    warp_ssim  the SSIM, the warped image, d ssim / d flow and d warped / d flow (both paddings)

The reference runs in float64 on the CPU, on the values the kernel sees, and is rounded to the
kernel's dtype: so no TF32 convolution, autocast or GPU library of the machine can make a right
kernel look wrong. warp_kernel._checked decides what a failure means; WARP_KERNEL_SELF_CHECK=0
turns the check off. It costs a few milliseconds, once per op, dtype and device.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

import warp_kernel
from warp_kernel import testing

SHAPE = (2, 3, 16, 19)  # two images (a mix-up between them shows), a ragged second tile
MAX_PX = 3.0  # flow amplitude: samples leave the image near its edges, so padding matters
SEED = 24
PADDINGS = ("border", "reflection")


def can_run(device):
    """Whether the check can run here on real tensors: not while a tracer makes every tensor a
    fake one (torch.export, make_fx), nor inside a CUDA graph capture (it reads results back)."""
    if _get_current_dispatch_mode() is not None:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def make_inputs(dtype):
    """[img, flow, ref, grad_warped] of SHAPE, float64 on the CPU, holding values of `dtype`.

    img uniform in [0, 1]; ref half noise, half img shifted a column (an SSIM far from 0 and 1);
    flow a random 4 x 5 grid of displacements within MAX_PX upsampled, kept off integer sample
    positions (where the bilinear derivative jumps); grad_warped uniform in [-0.5, 0.5]. Drawn
    from a private generator: the caller's random state is left as it was.
    """
    g = torch.Generator().manual_seed(SEED)
    b, _, h, w = SHAPE
    img = torch.rand(SHAPE, generator=g, dtype=torch.float64)
    ref = 0.5 * torch.rand(SHAPE, generator=g, dtype=torch.float64) + 0.5 * img.roll(1, -1)
    coarse = (torch.rand(b, 2, 4, 5, generator=g, dtype=torch.float64) * 2 - 1) * MAX_PX
    flow = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    grad_warped = torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5
    tensors = (img, testing.away_from_integers(flow), ref, grad_warped)
    return [t.to(dtype).to(torch.float64).contiguous() for t in tensors]


def _weighted(s):
    """sum_b (b + 1) s[b]: a loss that tells the images apart."""
    return (s * torch.arange(1, s.numel() + 1, dtype=s.dtype, device=s.device)).sum()


def _flow_warp(ext, img, flow, ref, grad_warped):
    results = {}
    for padding in PADDINGS:
        i, f = img.clone().requires_grad_(), flow.clone().requires_grad_()
        warped = warp_kernel._flow_warp(i, f, padding, ext)
        grad_img, grad_flow = torch.autograd.grad((warped * grad_warped).sum(), (i, f))
        results[f"warped image ({padding})"] = warped
        results[f"d/d img ({padding})"] = grad_img
        results[f"d/d flow ({padding})"] = grad_flow
    return results


def _ssim(ext, img, flow, ref, grad_warped):
    x = img.clone().requires_grad_()
    s = warp_kernel._ssim(x, ref, 1.0, ext)
    (grad_x,) = torch.autograd.grad(_weighted(s), x)
    return {"ssim": s, "d ssim / d x": grad_x}


def _warp_ssim(ext, img, flow, ref, grad_warped):
    """The attack's call: only the flow requires grad; the SSIM and the warped image (which a
    fidelity loss uses) each send it a gradient, computed here one at a time."""
    results = {}
    for padding in PADDINGS:
        f = flow.clone().requires_grad_()
        s, warped = warp_kernel._warp_ssim(img, f, ref, padding, 1.0, ext)
        (grad_ssim,) = torch.autograd.grad(_weighted(s), f, retain_graph=True)
        (grad_warped_flow,) = torch.autograd.grad((warped * grad_warped).sum(), f)
        results[f"ssim ({padding})"] = s
        results[f"warped image ({padding})"] = warped
        results[f"d ssim / d flow ({padding})"] = grad_ssim
        results[f"d warped / d flow ({padding})"] = grad_warped_flow
    return results


OPS = {"flow_warp": _flow_warp, "ssim": _ssim, "warp_ssim": _warp_ssim}


def _mismatch(error):
    """torch.testing's mismatch report on one line."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    return "; ".join(lines) or str(error).strip()


def run(op, ext, dtype, device):
    """None if `op` of the extension named `ext` matches the pure-PyTorch op in `dtype` on
    `device`, else what disagreed and by how much (or what the kernel raised)."""
    with contextlib.ExitStack() as stack:
        # Gradients even under no_grad or inference_mode; no autocast of the reference.
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in {"cpu", device.type}:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        inputs = make_inputs(dtype)
        want = OPS[op]("", *inputs)
        try:
            got = OPS[op](ext, *(t.to(device=device, dtype=dtype) for t in inputs))
            got = {name: t.detach().cpu() for name, t in got.items()}
        except Exception as e:  # noqa: BLE001 - a kernel that fails to run fails its check
            first = (str(e).strip().splitlines() or [""])[0]
            return f"the kernel raised {type(e).__name__}: {first[:300]}"
    for name, expected in want.items():
        floor = testing.ssim_floor(dtype) if name.startswith("ssim") else 0.0
        try:
            testing.assert_close(got[name], expected.detach().to(dtype), floor)
        except AssertionError as e:
            return f"{name}: {_mismatch(e)}"
    return None
