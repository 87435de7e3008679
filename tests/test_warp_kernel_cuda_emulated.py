"""The CUDA kernels, run on CPU threads (warp_kernel/csrc/cuda_emulation.h), against the
pure-PyTorch reference: their tiles, halos, block reductions and atomics are checked on machines
without a GPU. The autograd Functions are the ones impl="cuda" uses."""

import pytest
import torch

import warp_kernel
from warp_kernel.testing import assert_close, load_cuda_emulation, make_inputs, ssim_floor

PADDINGS = {"border": 0, "reflection": 1}
# Several 16x16 tiles with ragged edges, and a single-window image.
SHAPES = [(2, 3, 23, 37), (1, 1, 11, 40), (1, 2, 33, 17)]


@pytest.fixture(scope="module")
def emu():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_cuda_emulation()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_emulated_flow_warp(emu, padding, dtype):
    img, flow, _, grad_out = make_inputs((2, 3, 23, 37), seed=1, dtype=dtype)
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
        assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_ssim(emu, shape, dtype):
    x, _, y, _ = make_inputs(shape, seed=2, dtype=dtype)
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
        assert_close(actual, expected, ssim_floor(dtype) if i == 0 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs", [(False, True, False), (True, True, True)], ids=["flow", "all"])
def test_emulated_warp_ssim(emu, shape, padding, dtype, needs):
    img, flow, ref, grad_warped = make_inputs(shape, seed=3, dtype=dtype)
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
            assert_close(actual, expected, ssim_floor(dtype) if i == 0 else 0.0)
