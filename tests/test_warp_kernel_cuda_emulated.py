"""The CUDA extension on CPU threads (warp_kernel/csrc/cuda_emulation.h) against the pure-PyTorch
reference: its kernels (tiles, halos, block reductions, the sorted gather of the image
gradient, launch configurations) and its host-side code (device guard, stream, scratch) are
checked on machines without a GPU. impl="cuda" is pointed at the emulation, so the Python
functions and autograd Functions are the ones a GPU runs. The emulation starts all threads of a
block together and runs the blocks in a new shuffled order at every launch, so that races and
order-dependent sums show as differences between runs."""

import os
import subprocess
import sys

import pytest
import torch

import warp_kernel
from warp_kernel.testing import (
    assert_all_close,
    assert_far_corner_matches,
    assert_half_precision_is_float32,
    converging_flow,
    corner_blocks,
    make_inputs,
    only_blocks,
    run_flow_warp,
    run_ssim,
    run_warp_ssim,
)

PADDINGS = ["border", "reflection"]
# Several 16x16 tiles with ragged edges, and a single-window image.
SHAPES = [(2, 3, 23, 37), (1, 1, 11, 40), (1, 2, 33, 17)]
DTYPES = [torch.float32, torch.float64]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(warp_kernel.__file__)))


@pytest.fixture
def cuda(emu, monkeypatch):
    """impl="cuda" runs the emulated extension, on CPU tensors, without its self-check: these
    tests check the kernels themselves, and count their launches (tests of the self-check are in
    test_warp_kernel_self_check.py)."""
    monkeypatch.setenv(warp_kernel.SELF_CHECK_ENV, "0")
    resolve = warp_kernel._resolve
    monkeypatch.setattr(
        warp_kernel,
        "_resolve",
        lambda impl, device: emu if impl == "cuda" else resolve(impl, device),
    )
    emu.launches()  # forget earlier launches
    return emu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_emulated_flow_warp(cuda, padding, dtype):
    img, flow, _, grad_out = make_inputs((2, 3, 23, 37), seed=1, dtype=dtype)
    got = run_flow_warp("cuda", img, flow, grad_out, padding)
    assert_all_close(got, run_flow_warp("torch", img, flow, grad_out, padding), dtype, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_ssim(cuda, shape, dtype):
    x, _, y, _ = make_inputs(shape, seed=2, dtype=dtype)
    assert_all_close(run_ssim("cuda", x, y), run_ssim("torch", x, y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs", [(False, True, False), (True, True, True)], ids=["flow", "all"])
def test_emulated_warp_ssim(cuda, shape, padding, dtype, needs):
    img, flow, ref, grad_warped = make_inputs(shape, seed=3, dtype=dtype)
    got = run_warp_ssim("cuda", img, flow, ref, padding, grad_warped, needs, True)
    want = run_warp_ssim("torch", img, flow, ref, padding, grad_warped, needs, True)
    assert_all_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_half_precision_inputs_are_computed_in_float32(cuda, dtype):
    assert_half_precision_is_float32("cuda", dtype)


@pytest.mark.parametrize("padding", PADDINGS)
def test_emulated_many_samples_on_one_pixel(cuda, padding):
    """Every output pixel samples the 2 x 2 pixels at (6, 4); then the last pixel (past the
    image's corner, where the right and bottom weights are 0)."""
    img, _, ref, grad_out = make_inputs((2, 3, 23, 37), seed=5, dtype=torch.float64)
    for flow in (converging_flow(2, 23, 37, 6.05, 4.05), converging_flow(2, 23, 37, 40.0, 30.0)):
        got = run_flow_warp("cuda", img, flow, grad_out, padding)
        assert_all_close(
            got, run_flow_warp("torch", img, flow, grad_out, padding), torch.float64, False
        )
        needs = (True, True, True)
        got = run_warp_ssim("cuda", img, flow, ref, padding, grad_out, needs, True)
        want = run_warp_ssim("torch", img, flow, ref, padding, grad_out, needs, True)
        assert_all_close(got, want, torch.float64)


def test_emulated_results_are_the_same_on_every_run(cuda):
    """The image gradient (many samples per pixel) and the SSIM (a sum over blocks) add up in
    the same order whatever the order of the blocks and threads: the same bits at every run."""
    img, flow, ref, grad_out = make_inputs((2, 3, 37, 40), seed=6, dtype=torch.float64)
    flow = 0.5 * flow + 0.5 * converging_flow(2, 37, 40, 20.3, 12.6)
    needs = (True, True, True)
    runs = [
        run_flow_warp("cuda", img, flow, grad_out, "border")
        + run_warp_ssim("cuda", img, flow, ref, "reflection", grad_out, needs, True)
        for _ in range(4)
    ]
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("padding", PADDINGS)
def test_emulated_gradcheck(cuda, padding):
    """gradcheck in its fast mode (Jacobians projected on random vectors: a few dozen launches,
    not thousands), with its test that the backward gives the same result twice."""
    img, flow, ref, _ = make_inputs((2, 2, 12, 13), seed=7, dtype=torch.float64, max_px=4.0)
    img, flow, ref = (t.requires_grad_() for t in (img, flow, ref))
    for fn, inputs in [
        (lambda i, f: warp_kernel.flow_warp(i, f, padding, impl="cuda"), (img, flow)),
        (lambda x, y: warp_kernel.ssim(x, y, impl="cuda"), (img, ref)),
        (lambda i, f, r: warp_kernel.warp_ssim(i, f, r, padding, impl="cuda"), (img, flow, ref)),
    ]:
        torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_emulated_launches_follow_the_current_stream_and_device(cuda):
    """Every kernel is launched on the stream PyTorch calls current (here a label, 7), with the
    inputs' device made current by the guard."""
    img, flow, ref, grad_out = make_inputs((1, 2, 20, 18), seed=8)
    cuda.set_stream(7)
    try:
        run_flow_warp("cuda", img, flow, grad_out, "border")
        run_ssim("cuda", img, ref)
        run_warp_ssim("cuda", img, flow, ref, "border", grad_out, (True, True, True), True)
    finally:
        cuda.set_stream(0)
    launches = cuda.launches()
    # warp: forward, backward, image gradient; ssim: two kernels; warp_ssim: two, then the warp
    # backward for the flow gradient of `warped` (one) and for the image gradient (two)
    assert len(launches) == 3 + 2 + 2 + 1 + 2
    assert set(launches) == {(7, "cpu")}


def test_emulated_batches_beyond_65535_images(emu):
    """The batch is folded into the grid's x dimension (y and z stop at 65535). Only the last
    two blocks of every grid run; they cover the last image."""
    b = 70000
    img, flow, ref, grad_out = make_inputs((b, 1, 11, 11), seed=9, max_px=3.0)
    with only_blocks(emu, [(-2, None)]):
        warped = emu.flow_warp_forward(img, flow, 0)
        grad_img, grad_flow = emu.flow_warp_backward(grad_out, img, flow, 0, True, True)
        ssim, _, _, unit_flow, unit_ref = emu.warp_ssim_forward(img, flow, ref, 0, 1.0, 0, 1, 1)
    last = [t[-1:].clone() for t in (img, flow, ref, grad_out)]
    want = run_flow_warp("torch", last[0], last[1], last[3], "border")
    assert_all_close([warped[-1:], grad_img[-1:], grad_flow[-1:]], want, torch.float32, False)
    got = [ssim[-1:], unit_flow[-1:], unit_ref[-1:]]
    want = run_warp_ssim("torch", *last[:3], "border", last[3], (False, True, True), False)
    assert_all_close(got, [want[0], want[3], want[4]], torch.float32)


def test_emulated_image_over_a_million_rows_high(emu):
    shape = (1, 2, 1_100_000, 64)  # 68750 rows of tiles
    with only_blocks(emu, corner_blocks(shape, emu.tile)):
        assert_far_corner_matches(emu, shape)


FAR_CORNER = r"""
import sys, torch
from warp_kernel import testing
torch.set_num_threads(1)
emu = testing.load_cuda_emulation()
shape = (1, 1, 26800, 26800)
try:
    inputs = testing.far_corner_inputs(shape)
except RuntimeError as e:  # the tensors are reserved, never written: only address space
    print("no memory:", str(e).splitlines()[0])
    sys.exit(0)
del inputs
try:
    with testing.only_blocks(emu, testing.corner_blocks(shape, emu.tile)):
        testing.assert_far_corner_matches(emu, shape)
except RuntimeError as e:
    if "can't allocate memory" not in str(e):
        raise
    print("no memory:", str(e).splitlines()[0])
    sys.exit(0)
print("ok")
"""


def test_emulated_offsets_past_2_31(emu):
    """A 26800 x 26800 image: the SSIM gradient's four partial maps span 4 * 26800^2 > 2^31
    values. Run in a subprocess: an overflowing offset writes outside the tensor and crashes."""
    run = subprocess.run(
        [sys.executable, "-c", FAR_CORNER], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if run.stdout.startswith("no memory"):
        pytest.skip(f"cannot reserve 40 GB of address space: {run.stdout.strip()}")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_emulated_size_guard(emu):
    """The kernels index one tensor with 32-bit ints: a tensor of 2^31 values or more is refused
    with a clear error (allocated, never written, so it costs no memory)."""
    try:
        big = torch.empty((1, 1, 46341, 46341))  # 2^31 + 4633 values
    except RuntimeError as e:
        pytest.skip(f"cannot reserve 8.6 GB of address space: {str(e).splitlines()[0]}")
    with only_blocks(emu, [(0, 0)]):  # if the guard let it through, no block would run
        with pytest.raises(RuntimeError, match=rf"x is too large \({46341**2} elements"):
            emu.ssim_forward(big, big, 1.0, False, False)
        with pytest.raises(RuntimeError, match="img is too large"):
            emu.flow_warp_forward(big, big, 0)


def test_gpu_checks_run_on_the_emulation(cuda, monkeypatch):
    """python -m warp_kernel.check's determinism, one-pixel and self-check checks, on small
    images: the command stays tested, on the kernels it checks."""
    from warp_kernel import check

    monkeypatch.setattr(check, "DEVICE", "cpu")  # IMPL stays "cuda", which runs the emulation
    check.check_determinism((1, 2, 30, 33), runs=3)
    check.check_many_samples_on_one_pixel((1, 2, 23, 37))
    check.check_self_check()
