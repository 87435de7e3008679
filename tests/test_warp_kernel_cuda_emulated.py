"""The CUDA kernels, run on CPU threads (warp_kernel/csrc/cuda_emulation.h), against the
pure-PyTorch reference: their tiles, halos, block reductions and atomics are checked on machines
without a GPU. The autograd Functions are the ones impl="cuda" uses."""

import pytest
import torch

import warp_kernel
from warp_kernel import build

PADDINGS = {"border": 0, "reflection": 1}
# Several 16x16 tiles with ragged edges, and a single-window image.
SHAPES = [(2, 3, 23, 37), (1, 1, 11, 40), (1, 2, 33, 17)]


@pytest.fixture(scope="module")
def emu():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build.load_cuda_emulation()
    torch.set_num_threads(threads)


def make_inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = shape
    img = torch.rand(shape, generator=g, dtype=torch.float64)
    ref = 0.5 * torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 * img.roll(1, -1)
    flow = (torch.rand(b, 2, h, w, generator=g, dtype=torch.float64) * 2 - 1) * 20
    flow = flow.floor() + 0.05 + 0.9 * (flow - flow.floor())  # away from integer positions
    grad_warped = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    return [t.to(dtype).contiguous() for t in (img, flow, ref, grad_warped)]


def tolerances(dtype):
    return (1e-4, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)


def assert_close(actual, expected, dtype, floor=0.0):
    rtol, scale = tolerances(dtype)
    atol = max(scale * float(expected.abs().max()), floor) + 1e-15
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def ssim_floor(dtype):
    return 1e-6 if dtype == torch.float32 else 0.0  # SSIM lies in [-1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_emulated_flow_warp(emu, padding, dtype):
    img, flow, _, grad_out = make_inputs((2, 3, 23, 37), dtype, seed=1)
    outs = []
    for run in ("emulated", "torch"):
        i, f = img.clone().requires_grad_(), flow.clone().requires_grad_()
        if run == "torch":
            out = warp_kernel.flow_warp(i, f, padding, impl="torch")
        else:
            out = warp_kernel._FlowWarp.apply(i, f, PADDINGS[padding], emu)
        out.backward(grad_out)
        outs.append((out.detach(), i.grad, f.grad))
    for actual, expected in zip(*outs):
        assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_ssim(emu, shape, dtype):
    x, _, y, _ = make_inputs(shape, dtype, seed=2)
    outs = []
    for run in ("emulated", "torch"):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        if run == "torch":
            s = warp_kernel.ssim(xx, yy, impl="torch")
        else:
            s = warp_kernel._SSIM.apply(xx, yy, 1.0, (True, True), emu)
        (s * torch.arange(1.0, s.numel() + 1, dtype=dtype)).sum().backward()
        outs.append((s.detach(), xx.grad, yy.grad))
    for i, (actual, expected) in enumerate(zip(*outs)):
        assert_close(actual, expected, dtype, ssim_floor(dtype) if i == 0 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs", [(False, True, False), (True, True, True)], ids=["flow", "all"])
def test_emulated_warp_ssim(emu, shape, padding, dtype, needs):
    img, flow, ref, grad_warped = make_inputs(shape, dtype, seed=3)
    outs = []
    for run in ("emulated", "torch"):
        i, f, r = (t.clone().requires_grad_(n) for t, n in zip((img, flow, ref), needs))
        if run == "torch":
            s, w = warp_kernel.warp_ssim(i, f, r, padding, impl="torch")
        else:
            s, w = warp_kernel._WarpSSIM.apply(i, f, r, PADDINGS[padding], 1.0, needs, emu)
        loss = (s * torch.arange(1.0, s.numel() + 1, dtype=dtype)).sum() + (w * grad_warped).sum()
        loss.backward()
        outs.append((s.detach(), w.detach(), i.grad, f.grad, r.grad))
    for i, (actual, expected) in enumerate(zip(*outs)):
        if expected is None:
            assert actual is None
        else:
            assert_close(actual, expected, dtype, ssim_floor(dtype) if i == 0 else 0.0)
