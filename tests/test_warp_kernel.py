"""warp_kernel: every backend against the pure-PyTorch reference, gradients, identities, errors.

The C++ extension is built on first use (cached); the CUDA extension is built and imported here
too (nvcc needs no GPU), while the tests that launch CUDA kernels need a GPU and skip without one.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import warp_kernel
from warp_kernel import build, reference
from warp_kernel.testing import (
    GRAD_CASES,
    assert_all_close,
    assert_close,
    assert_half_precision_is_float32,
    away_from_integers,
    make_inputs,
    run_flow_warp,
    run_ssim,
    run_warp_ssim,
    ssim_floor,
)

HAS_GPU = torch.cuda.is_available()
SHAPES = [(1, 3, 23, 31), (3, 1, 17, 40), (3, 3, 32, 29), (1, 1, 11, 12)]  # odd, non-square
PADDINGS = ["border", "reflection"]
SSIM_FLOOR = ssim_floor(torch.float32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores: oversubscription makes these tests many times slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_ext():
    module = build.load("cpu", warn=False)
    if module is None:
        pytest.skip(f"C++ extension unavailable: {build.failure('cpu')}")
    return module


def backends_under_test():
    params = [pytest.param("cpp", "cpu", id="cpp")]
    params.append(
        pytest.param(
            "cuda", "cuda", id="cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no GPU")
        )
    )
    return params


# ---------------------------------------------------------------------------------------------
# Backends against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl,device", backends_under_test())
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flow_warp_matches_torch(impl, device, padding, shape):
    img, flow, _, grad_out = make_inputs(shape, seed=1, device=device)
    got = run_flow_warp(impl, img, flow, grad_out, padding)
    assert_all_close(
        got, run_flow_warp("torch", img, flow, grad_out, padding), torch.float32, False
    )


@pytest.mark.parametrize("impl,device", backends_under_test())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ssim_matches_torch(impl, device, shape):
    x, _, y, _ = make_inputs(shape, seed=2, device=device)
    assert_all_close(run_ssim(impl, x, y), run_ssim("torch", x, y), torch.float32)


@pytest.mark.parametrize("impl,device", backends_under_test())
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_warp_ssim_matches_torch(impl, device, padding, shape, case):
    needs, use_warped = GRAD_CASES[case]
    img, flow, ref, grad_warped = make_inputs(shape, seed=3, device=device)
    got = run_warp_ssim(impl, img, flow, ref, padding, grad_warped, needs, use_warped)
    want = run_warp_ssim("torch", img, flow, ref, padding, grad_warped, needs, use_warped)
    assert_all_close(got, want, torch.float32)


def coherent_flow(kind, b, h, w, seed):
    """(B, 2, H, W) float32 flows whose neighbouring pixels move alike, as uad.py's do: the
    C++ path reads the corners of 16 such samples from a few rows with permutes instead of
    gathers (AVX-512), and gathers where they spread over more than 4 rows or 32 columns.
      constant: one fractional shift per image, past the border at one side;
      smooth:   a few pixels of slowly varying displacement;
      torn:     smooth, but every other strip of 24 columns jumps 9 rows down and 37 columns
                left: groups of 16 samples that straddle a tear gather, the others do not."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    flow = torch.zeros(b, 2, h, w, dtype=torch.float64)
    for i in range(b):
        phase, sign = float(torch.rand(1, generator=g)) * 6, (-1) ** i
        if kind == "constant":
            flow[i, 0], flow[i, 1] = 2.3 * sign, -1.6 * sign
        else:
            flow[i, 0] = 4 * torch.sin(xs / 9 + ys / 13 + phase) + 0.4 * sign
            flow[i, 1] = 2 * torch.cos(xs / 17 - ys / 7 + phase) - 0.3 * sign
    if kind == "torn":
        strips = (xs.long() // 24) % 2 == 1
        flow[:, 0][:, strips] -= 37
        flow[:, 1][:, strips] += 9
    return away_from_integers(flow).float()


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", ["constant", "smooth", "torn"])
@pytest.mark.parametrize("shape", [(2, 3, 29, 70), (1, 1, 40, 32)], ids=["29x70", "40x32"])
def test_coherent_flows_match_torch(cpu_ext, padding, kind, shape):
    img, _, ref, grad_out = make_inputs(shape, seed=16)
    flow = coherent_flow(kind, shape[0], shape[2], shape[3], seed=17)
    warp = (img, flow, grad_out, padding)
    got, want = run_flow_warp("cpp", *warp), run_flow_warp("torch", *warp)
    assert_all_close(got, want, torch.float32, False)
    fused = (img, flow, ref, padding, grad_out, (True,) * 3, True)
    assert_all_close(run_warp_ssim("cpp", *fused), run_warp_ssim("torch", *fused), torch.float32)


def test_warp_ssim_data_range_and_no_grad(cpu_ext):
    img, flow, ref, _ = make_inputs((2, 3, 20, 21), seed=4)
    img, ref = img * 255, ref * 255
    with torch.no_grad():
        s_cpp, w_cpp = warp_kernel.warp_ssim(img, flow, ref, data_range=255.0, impl="cpp")
    s_ref, w_ref = warp_kernel.warp_ssim(img, flow, ref, data_range=255.0, impl="torch")
    assert_close(s_cpp, s_ref.detach(), floor=SSIM_FLOOR)
    assert_close(w_cpp, w_ref.detach())
    assert not s_cpp.requires_grad


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_backward_twice_with_a_retained_graph(cpu_ext, weight):
    """The backward scales gradients saved by the forward: running the backward of a retained
    graph again, after modifying the first results in place, gives the same gradients."""
    img, flow, ref, grad_warped = make_inputs((2, 3, 20, 21), seed=20)
    for use_warped in (False, True):
        i, f, r = (t.clone().requires_grad_() for t in (img, flow, ref))
        s, w = warp_kernel.warp_ssim(i, f, r, impl="cpp")
        x, y = img.clone().requires_grad_(), ref.clone().requires_grad_()
        s2 = warp_kernel.ssim(x, y, impl="cpp")
        loss = weight * (s.sum() + s2.sum()) + ((w * grad_warped).sum() if use_warped else 0)
        leaves = (i, f, r, x, y)
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        kept = [g.clone() for g in first]
        for g in first:
            g.mul_(-3.0)  # e.g. an in-place clip or rescale of the returned gradients
        second = torch.autograd.grad(loss, leaves)
        for a, b in zip(kept, second):
            assert torch.equal(a, b)


def test_cpp_result_does_not_depend_on_thread_count(cpu_ext):
    img, flow, ref, _ = make_inputs((1, 3, 96, 70), seed=5)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        f = flow.clone().requires_grad_()
        s, w = warp_kernel.warp_ssim(img, f, ref, impl="cpp")
        s.sum().backward()
        results.append((s.detach(), w, f.grad))
    torch.set_num_threads(1)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Gradients by finite differences (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(impl, padding):
    if impl == "cpp" and build.load("cpu", warn=False) is None:
        pytest.skip(f"C++ extension unavailable: {build.failure('cpu')}")
    img, flow, ref, _ = make_inputs((2, 2, 12, 13), seed=6, dtype=torch.float64, max_px=4.0)
    img, flow, ref = (t.requires_grad_() for t in (img, flow, ref))

    def warp(i, f):
        return warp_kernel.flow_warp(i, f, padding, impl=impl)

    def ssim(x, y):
        return warp_kernel.ssim(x, y, impl=impl)

    def warp_ssim(i, f, r):
        return warp_kernel.warp_ssim(i, f, r, padding, impl=impl)

    for fn, args in ((warp, (img, flow)), (ssim, (img, ref)), (warp_ssim, (img, flow, ref))):
        torch.autograd.gradcheck(fn, args)  # raises with the mismatching Jacobian entries


# ---------------------------------------------------------------------------------------------
# Identities and an independent SSIM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_zero_flow_is_identity(impl, padding):
    if impl == "cpp" and build.load("cpu", warn=False) is None:
        pytest.skip(f"C++ extension unavailable: {build.failure('cpu')}")
    img, flow, _, _ = make_inputs((2, 3, 15, 22), seed=7)
    out = warp_kernel.flow_warp(img, torch.zeros_like(flow), padding, impl=impl)
    s, warped = warp_kernel.warp_ssim(img, torch.zeros_like(flow), img, padding, impl=impl)
    if impl == "torch":  # grid_sample's normalise / unnormalise round trip costs an ulp or so
        torch.testing.assert_close(out, img, rtol=0, atol=1e-5)
    else:  # the sample position is exactly the pixel, with weight exactly 0 on its neighbours
        assert torch.equal(out, img) and torch.equal(warped, img)
    torch.testing.assert_close(s, torch.ones(2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_ssim_of_an_image_with_itself_is_one(impl):
    if impl == "cpp" and build.load("cpu", warn=False) is None:
        pytest.skip(f"C++ extension unavailable: {build.failure('cpu')}")
    x, _, _, _ = make_inputs((3, 3, 19, 24), seed=8)
    torch.testing.assert_close(warp_kernel.ssim(x, x, impl=impl), torch.ones(3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("dx,dy", [(3, 0), (0, -2), (-4, 5)])
def test_integer_shift_is_slicing(impl, dx, dy):
    if impl == "cpp" and build.load("cpu", warn=False) is None:
        pytest.skip(f"C++ extension unavailable: {build.failure('cpu')}")
    img, _, _, _ = make_inputs((1, 3, 20, 25), seed=9)
    flow = torch.empty(1, 2, 20, 25)
    flow[:, 0], flow[:, 1] = dx, dy
    out = warp_kernel.flow_warp(img, flow, impl=impl)
    # out[y, x] = img[y + dy, x + dx] wherever that is inside the image
    ys = slice(max(0, -dy), 20 - max(0, dy))
    xs = slice(max(0, -dx), 25 - max(0, dx))
    src_ys = slice(ys.start + dy, ys.stop + dy)
    src_xs = slice(xs.start + dx, xs.stop + dx)
    torch.testing.assert_close(out[..., ys, xs], img[..., src_ys, src_xs], rtol=0, atol=1e-5)


def ssim_numpy(x, y, data_range=1.0):
    """Mean SSIM of (C, H, W) arrays straight from the definition: a 2-D 11x11 Gaussian window
    (sigma 1.5) over every valid position, in float64."""
    r = np.arange(-5, 6)
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    view = np.lib.stride_tricks.sliding_window_view
    xw, yw = view(x, (11, 11), axis=(1, 2)), view(y, (11, 11), axis=(1, 2))  # (C, Ho, Wo, 11, 11)
    mx, my = (xw * w).sum((-2, -1)), (yw * w).sum((-2, -1))
    vx = (w * (xw - mx[..., None, None]) ** 2).sum((-2, -1))
    vy = (w * (yw - my[..., None, None]) ** 2).sum((-2, -1))
    cxy = (w * (xw - mx[..., None, None]) * (yw - my[..., None, None])).sum((-2, -1))
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_matches_the_formula_in_float64(impl, data_range):
    if impl == "cpp" and build.load("cpu", warn=False) is None:
        pytest.skip(f"C++ extension unavailable: {build.failure('cpu')}")
    x, _, y, _ = make_inputs((2, 3, 18, 23), seed=10, dtype=torch.float64)
    x, y = x * data_range, y * data_range
    want = [ssim_numpy(x[b].numpy(), y[b].numpy(), data_range) for b in range(2)]
    got64 = warp_kernel.ssim(x, y, data_range, impl=impl)
    np.testing.assert_allclose(got64.numpy(), want, rtol=1e-12)
    got32 = warp_kernel.ssim(x.float(), y.float(), data_range, impl=impl)
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-5)


def test_gaussian_taps_are_the_formula(cpu_ext):
    r = np.arange(-5, 6)
    g = np.exp(-(r**2) / (2 * 1.5**2))
    np.testing.assert_allclose(cpu_ext.gaussian_taps().numpy(), g / g.sum(), rtol=1e-15)
    np.testing.assert_allclose(reference.gaussian_taps().numpy(), g / g.sum(), rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Bad input: clear Python errors, never a crash
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_bad_inputs_raise_value_errors(impl):
    img, flow, ref, _ = make_inputs((1, 3, 16, 16), seed=11)
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64, got torch.int"):
        warp_kernel.flow_warp((img * 255).int(), (flow * 255).int(), impl=impl)
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        warp_kernel.ssim((img * 255).to(torch.uint8), (ref * 255).to(torch.uint8), impl=impl)
    with pytest.raises(ValueError, match="flow is torch.float32 but img is torch.float16"):
        warp_kernel.flow_warp(img.half(), flow, impl=impl)
    with pytest.raises(ValueError, match="same|float64"):
        warp_kernel.flow_warp(img, flow.double(), impl=impl)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        warp_kernel.flow_warp(img[0], flow, impl=impl)
    with pytest.raises(ValueError, match=r"flow must be \(B, 2, H, W\)"):
        warp_kernel.flow_warp(img, flow[:, :1], impl=impl)
    with pytest.raises(ValueError, match=r"flow must be \(B, 2, H, W\)"):
        warp_kernel.warp_ssim(img, flow[..., :15], ref, impl=impl)
    with pytest.raises(ValueError, match="differ in shape"):
        warp_kernel.ssim(img, ref[:, :2], impl=impl)
    with pytest.raises(ValueError, match="at least 11x11"):
        warp_kernel.ssim(img[..., :10], ref[..., :10], impl=impl)
    with pytest.raises(ValueError, match="at least 11x11"):
        warp_kernel.warp_ssim(img[..., :10, :], flow[..., :10, :], ref[..., :10, :], impl=impl)
    with pytest.raises(ValueError, match="is on meta"):
        warp_kernel.ssim(img, ref.to("meta"), impl=impl)
    with pytest.raises(ValueError, match="padding"):
        warp_kernel.flow_warp(img, flow, padding="zeros", impl=impl)
    with pytest.raises(ValueError, match="data_range"):
        warp_kernel.ssim(img, ref, data_range=0.0, impl=impl)
    with pytest.raises(TypeError):
        warp_kernel.ssim(img.numpy(), ref, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(impl, dtype):
    assert_half_precision_is_float32(impl, dtype)


def test_bad_impl_and_device():
    img, _, ref, _ = make_inputs((1, 3, 16, 16), seed=12)
    with pytest.raises(ValueError, match="impl must be one of"):
        warp_kernel.ssim(img, ref, impl="fast")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        warp_kernel.ssim(img, ref, impl="cuda")
    if HAS_GPU:
        with pytest.raises(ValueError, match="runs on CPU tensors"):
            warp_kernel.ssim(img.cuda(), ref.cuda(), impl="cpp")


def test_non_contiguous_inputs(cpu_ext):
    img, flow, ref, _ = make_inputs((1, 3, 16, 18), seed=13)
    img_t = img.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, not contiguous
    assert not img_t.is_contiguous()
    # The extension itself refuses them with a clear RuntimeError...
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_ext.flow_warp_forward(img_t, flow, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_ext.ssim_forward(img_t, ref, 1.0, False, False)
    # ... and the Python functions hand it contiguous copies.
    assert torch.equal(
        warp_kernel.flow_warp(img_t, flow, impl="cpp"), warp_kernel.flow_warp(img, flow, impl="cpp")
    )


def test_extension_checks_every_input(cpu_ext):
    img, flow, ref, _ = make_inputs((1, 3, 16, 16), seed=14)
    cases = [
        (lambda: cpu_ext.flow_warp_forward(img.half(), flow.half(), 0), "float32 or float64"),
        (lambda: cpu_ext.flow_warp_forward(img[0], flow, 0), r"\(B, C, H, W\)"),
        (lambda: cpu_ext.flow_warp_forward(img, flow[:, :1].contiguous(), 0), "flow must be"),
        (lambda: cpu_ext.flow_warp_forward(img, flow.double(), 0), "same dtype"),
        (lambda: cpu_ext.flow_warp_forward(img, flow, 7), "padding code"),
        (lambda: cpu_ext.ssim_forward(img[..., :10].contiguous(), ref[..., :10].contiguous(), 1.0, 0, 0), "at least"),
        (lambda: cpu_ext.ssim_forward(img, ref, -1.0, False, False), "data_range"),
        (lambda: cpu_ext.warp_ssim_forward(img, flow, ref[:, :2].contiguous(), 0, 1.0, 0, 0, 0), "shape"),
        (lambda: cpu_ext.flow_warp_backward(img, img, flow[:1, :1].contiguous(), 0, True, True), "flow"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    if HAS_GPU:
        with pytest.raises(RuntimeError, match="CPU tensor"):
            cpu_ext.flow_warp_forward(img.cuda(), flow.cuda(), 0)


@pytest.mark.parametrize("padding", PADDINGS)
def test_border_samples_use_only_weighted_neighbours(cpu_ext, padding):
    """Samples clamped to the last column or row give the edge pixel exactly; the pixel after
    a row's end (here NaN, the first of the next row) must not leak in with weight 0."""
    img = torch.rand(1, 2, 6, 7)
    img[:, :, 1:, 0] = float("nan")  # first column of every row but the first
    flow = torch.zeros(1, 2, 6, 7)
    flow[:, 0] = 50.0  # far right: every sample clamps (or mirrors) onto a column
    flow[:, 1, -1] = 50.0  # the last row also far down
    out = warp_kernel.flow_warp(img, flow, padding, impl="cpp")
    want = warp_kernel.flow_warp(img.nan_to_num(0.5), flow, padding, impl="torch")
    mask = torch.isfinite(want)
    assert torch.isfinite(out[mask]).all()
    torch.testing.assert_close(out[mask], want[mask], rtol=0, atol=1e-5)
    if padding == "border":  # the bottom-right corner, read without going past the plane
        assert torch.equal(out[..., -1, :], img[..., -1, -1:].expand(-1, -1, 7))


def test_non_finite_flow_does_not_crash(cpu_ext):
    img, flow, ref, _ = make_inputs((1, 2, 14, 14), seed=15)
    flow[0, 0, 3, 4], flow[0, 1, 5, 6], flow[0, 0, 7, 8] = float("nan"), float("inf"), -1e30
    for padding in PADDINGS:
        out = warp_kernel.flow_warp(img, flow, padding, impl="cpp")
        s, _ = warp_kernel.warp_ssim(img, flow, ref, padding, impl="cpp")
        assert out.shape == img.shape and s.shape == (1,)


# Run in a subprocess, so that a read past the image is one failed test, not a crashed run.
GUARDED_READS = r"""
import ctypes, mmap, sys
import numpy as np, torch, warp_kernel
torch.set_num_threads(1)
dtype, padding = getattr(torch, sys.argv[1]), sys.argv[2]
shape = (1, 3, 37, 70)  # 4 groups of 16 columns (windows or gathers) and 6 gathered columns
nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
pages = -(-nbytes // mmap.PAGESIZE) + 1
buf = mmap.mmap(-1, pages * mmap.PAGESIZE)
start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
guard = start + (pages - 1) * mmap.PAGESIZE  # the image ends where this page begins
assert libc.mprotect(guard, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()  # PROT_NONE
img = torch.from_numpy(np.frombuffer(
    buf, dtype=str(dtype).split(".")[1], count=int(np.prod(shape)),
    offset=(pages - 1) * mmap.PAGESIZE - nbytes).reshape(shape))
img.copy_(torch.rand(shape, dtype=dtype))
ref = torch.rand(shape, dtype=dtype)
ys, xs = torch.meshgrid(torch.arange(37.0), torch.arange(70.0), indexing="ij")
torn = torch.full((1, 2, 37, 70), 30.25)
torn[:, 0, :, ::2] = -40.0  # groups spread over 70 columns: gathered
for flow in (torch.full((1, 2, 37, 70), 30.25),  # every sample beyond the bottom-right corner
             torch.stack([2.5 + 20 * xs / 69, 1.5 + 3 * ys / 36])[None],  # towards it
             torn):
    flow = flow.to(dtype)
    out = warp_kernel.flow_warp(img, flow, padding, impl="cpp")
    want = warp_kernel.flow_warp(img, flow, padding, impl="torch")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    flow.requires_grad_(True)
    s, _ = warp_kernel.warp_ssim(img, flow, ref, padding, impl="cpp")
    s.sum().backward()
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_reads_stay_inside_the_image(cpu_ext, dtype, padding):
    """The image ends where an unreadable page begins, and the flows sample its last pixels:
    a read past the image (a 64-bit pair, a 32-column window) would crash."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(warp_kernel.__file__)))
    run = subprocess.run(
        [sys.executable, "-c", GUARDED_READS, dtype, padding],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Dispatch, fallback, build
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_build_state(monkeypatch):
    """Forget every loaded extension and failure, as in a new process."""
    monkeypatch.setattr(build, "_modules", {})
    monkeypatch.setattr(build, "_failures", {})
    monkeypatch.setattr(build, "_warned", set())
    monkeypatch.delenv(warp_kernel.IMPL_ENV, raising=False)


def test_failed_build_warns_once_and_falls_back(fresh_build_state, monkeypatch):
    monkeypatch.setattr(build, "_missing_tools", lambda backend: "no C++ compiler (test)")
    x, _, y, _ = make_inputs((1, 3, 16, 16), seed=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s1 = warp_kernel.ssim(x, y)
        s2 = warp_kernel.ssim(x, y)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "cpp backend is unavailable" in messages[0] and "no C++ compiler (test)" in messages[0]
    assert "pure-PyTorch" in messages[0]
    assert torch.equal(s1, reference.ssim(x, y)) and torch.equal(s1, s2)
    with pytest.raises(RuntimeError, match=r"impl='cpp' is unavailable: no C\+\+ compiler"):
        warp_kernel.ssim(x, y, impl="cpp")
    assert warp_kernel.backends() == {"torch": True, "cpp": False, "cuda": False}


def test_compile_error_is_caught(fresh_build_state, monkeypatch):
    def broken_build(backend, verbose):
        raise RuntimeError("Error building extension 'warp_kernel_cpu': some compiler error")

    monkeypatch.setattr(build, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="build failed: RuntimeError: .*some compiler error"):
        assert build.load("cpu") is None


def test_environment_variable_forces_a_backend(fresh_build_state, monkeypatch):
    def no_build(backend, verbose=False, warn=True):
        raise AssertionError("WARP_KERNEL_IMPL=torch must not load an extension")

    monkeypatch.setattr(build, "load", no_build)
    monkeypatch.setenv(warp_kernel.IMPL_ENV, "torch")
    x, _, y, _ = make_inputs((1, 3, 16, 16), seed=17)
    assert torch.equal(warp_kernel.ssim(x, y), reference.ssim(x, y))
    monkeypatch.setenv(warp_kernel.IMPL_ENV, "gpu")
    with pytest.raises(ValueError, match="WARP_KERNEL_IMPL='gpu'"):
        warp_kernel.ssim(x, y)


def test_import_never_builds(tmp_path):
    env = dict(os.environ, WARP_KERNEL_BUILD_DIR=str(tmp_path / "cache"))
    code = (
        "import warp_kernel, warp_kernel.build as b; "
        "assert not b._modules and not b._failures; "
        "assert b.build_root().parent.name == 'cache'"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(warp_kernel.__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)
    assert not (tmp_path / "cache").exists()


def test_wheel_ships_every_file_the_build_needs(tmp_path):
    """setup.py's packages and package_data against the tree: a wheel built from a copy of the
    project holds every source the extensions are compiled from, and every module of uad.py,
    eval.py, warp_kernel and unsegment."""
    root = Path(warp_kernel.__file__).resolve().parent.parent
    src = tmp_path / "src"
    src.mkdir()
    for path in [*root.glob("*.py"), root / "README.md"]:
        shutil.copy(path, src / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build")
    for package in ("warp_kernel", "unsegment"):
        shutil.copytree(root / package, src / package, ignore=ignore)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    run = subprocess.run(
        [*command, "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = [p.relative_to(root).as_posix() for p in build.source_files()]
    for package in ("warp_kernel", "unsegment"):
        needed += [p.relative_to(root).as_posix() for p in (root / package).glob("*.py")]
    needed += ["uad.py", "eval.py"]
    assert not [name for name in needed if name not in shipped]


def test_cpu_isa_follows_torch(monkeypatch):
    monkeypatch.delenv("WARP_KERNEL_CPU_ISA", raising=False)
    for capability, suffix in [("AVX512", "x86v4"), ("AVX2", "x86v3"), ("DEFAULT", "base")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert build._cpu_isa()[0] == suffix
    monkeypatch.setenv("WARP_KERNEL_CPU_ISA", "x86-64-v3")
    assert build._cpu_isa() == ("x86v3", ["-march=x86-64-v3", "-mtune=skylake"])
    monkeypatch.setenv("WARP_KERNEL_CPU_ISA", "avx9")
    with pytest.raises(ValueError, match="WARP_KERNEL_CPU_ISA='avx9' is not one of auto"):
        build._cpu_isa()


@pytest.mark.skipif(torch.version.cuda is None, reason="PyTorch without CUDA")
def test_cuda_toolkit_is_checked_where_the_build_looks(tmp_path, monkeypatch):
    """A CUDA_HOME guessed from an nvcc wrapper on PATH (/usr/local/bin/nvcc gives /usr/local)
    has no headers: that is reported as missing, not left to fail the build."""
    cpp_extension = build._cpp_extension()
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    monkeypatch.setattr(build, "CUDA_TOOLKIT_FOLDERS", ())  # no toolkit to fall back on
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert "has no include/cuda_runtime.h" in build._missing_tools("cuda")
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert build._missing_tools("cuda") is None
    (tmp_path / "bin" / "nvcc").unlink()
    assert "has no bin/nvcc" in build._missing_tools("cuda")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "no CUDA toolkit found" in build._missing_tools("cuda")


def fake_toolkit(folder: Path) -> Path:
    """A CUDA toolkit tree with what the build looks for: bin/nvcc, include/cuda_runtime.h."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime.h").write_text("")
    return folder


@pytest.mark.skipif(torch.version.cuda is None, reason="PyTorch without CUDA")
@pytest.mark.parametrize("how", ["wrapper script", "symbolic link", "standard folder"])
def test_a_guessed_cuda_home_without_headers_falls_back_to_the_real_toolkit(
    tmp_path, monkeypatch, how
):
    """torch guesses CUDA_HOME=/usr/local from a /usr/local/bin/nvcc that is a wrapper script
    (exec /usr/local/cuda-13.0/bin/nvcc "$@") or a link; the build then uses the toolkit that
    nvcc runs, or else /usr/local/cuda, so that the README's plain test command builds it."""
    cpp_extension = build._cpp_extension()
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    real = fake_toolkit(tmp_path / "cuda-13.0")
    guess = tmp_path / "usr_local"
    (guess / "bin").mkdir(parents=True)
    monkeypatch.setattr(build, "CUDA_TOOLKIT_FOLDERS", ())
    if how == "wrapper script":
        (guess / "bin" / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    elif how == "symbolic link":
        (guess / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    else:
        (guess / "bin" / "nvcc").write_text("#!/bin/sh\n")
        monkeypatch.setattr(build, "CUDA_TOOLKIT_FOLDERS", (str(tmp_path / "nowhere"), str(real)))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(guess))
    assert build._missing_tools("cuda") is None
    assert cpp_extension.CUDA_HOME == str(real)
    if how == "wrapper script":  # named as the standard folder that links to it, if one does
        (tmp_path / "cuda").symlink_to(real)
        monkeypatch.setattr(build, "CUDA_TOOLKIT_FOLDERS", (str(tmp_path / "cuda"),))
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(guess))
        assert build._missing_tools("cuda") is None
        assert cpp_extension.CUDA_HOME == str(tmp_path / "cuda")


def test_cpu_extension_builds():
    module = build.load("cpu", warn=False)
    assert module is not None, build.failure("cpu")
    assert warp_kernel.backends()["cpp"] is True


@pytest.mark.skipif(torch.version.cuda is None, reason="PyTorch without CUDA")
def test_cuda_extension_builds_links_and_imports():
    missing = build._missing_tools("cuda")
    if missing and not os.environ.get("CI"):  # CI has the toolkit: there this must build
        pytest.skip(f"no CUDA toolkit to build with: {missing}")
    module = build.load("cuda", warn=False)
    assert module is not None, build.failure("cuda")
    for name in ("flow_warp_forward", "flow_warp_backward", "ssim_forward", "warp_ssim_forward"):
        assert callable(getattr(module, name))
    np.testing.assert_allclose(
        module.gaussian_taps().numpy(), reference.gaussian_taps().numpy(), rtol=1e-15
    )
    if not HAS_GPU:  # the bindings check the device before anything touches CUDA
        img, flow, _, _ = make_inputs((1, 1, 12, 12), seed=18)
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            module.flow_warp_forward(img, flow, 0)


@pytest.mark.skipif(not HAS_GPU, reason="no GPU")
@pytest.mark.parametrize("padding", PADDINGS)
def test_cuda_gradcheck(padding):
    img, flow, ref, _ = make_inputs(
        (2, 2, 12, 13), seed=19, dtype=torch.float64, device="cuda", max_px=4
    )
    img, flow, ref = (t.requires_grad_() for t in (img, flow, ref))

    def warp(i, f):
        return warp_kernel.flow_warp(i, f, padding, impl="cuda")

    def ssim(x, y):
        return warp_kernel.ssim(x, y, impl="cuda")

    def warp_ssim(i, f, r):
        return warp_kernel.warp_ssim(i, f, r, padding, impl="cuda")

    for fn, args in ((warp, (img, flow)), (ssim, (img, ref)), (warp_ssim, (img, flow, ref))):
        torch.autograd.gradcheck(fn, args)  # raises with the mismatching Jacobian entries


def test_gpu_check_command_runs_on_cpp(cpu_ext, monkeypatch):
    """python -m warp_kernel.check targets the GPU; its checks are device-agnostic, so running
    a few of them on the C++ backend keeps the command itself tested."""
    from warp_kernel import check

    monkeypatch.setattr(check, "DEVICE", "cpu")
    monkeypatch.setattr(check, "IMPL", "cpp")
    check.check_float32()
    check.check_identities()
    check.check_determinism((1, 3, 40, 37), runs=2)
    check.check_many_samples_on_one_pixel((2, 3, 29, 31))


def test_bench_command_runs(cpu_ext, tmp_path, capsys):
    from warp_kernel import bench

    out = tmp_path / "bench.json"
    args = ["--ops", "warp_ssim", "--sizes", "1x64", "--threads", "1", "--repeats", "4"]
    args += ["--backends", "cpp", "--warmup", "1", "--quiet", "--json", str(out)]
    assert bench.main(args) == 0
    assert "| warp_ssim | 1x64 | cpu | 1 | cpp |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["backend"] for r in rows} == {"torch-nchw", "torch-cl", "cpp"}


ODD_ARGUMENTS = [
    ("bench", ["--ops", "flow_wrap"], "invalid choice: 'flow_wrap'"),
    ("bench", ["--sizes", "1x"], "'1x' is not BATCHxSIDE"),
    ("bench", ["--sizes", "0x64"], "the batch must be at least 1"),
    ("bench", ["--sizes", "1x8"], "the side at least 11"),
    ("bench", ["--threads", "0"], "--threads: '0' is below 1"),
    ("bench", ["--repeats", "3"], "--repeats: '3' is below 4"),
    ("bench", ["--json", "no/such/folder/bench.json"], "no/such/folder' does not exist"),
    ("bench", ["--json", "."], "is a folder, not a file"),
    ("check", ["--json", "no/such/folder/bench.json"], "no/such/folder' does not exist"),
    ("check", ["--bench"], "unrecognized arguments: --bench"),
    ("build", ["--backend", "gpu"], "invalid choice: 'gpu'"),
]
if not HAS_GPU:
    ODD_ARGUMENTS.append(("bench", ["--backends", "cuda"], "'cuda' is not available here: no CUDA"))


@pytest.mark.parametrize("command,argv,message", ODD_ARGUMENTS)
def test_commands_refuse_odd_arguments_in_one_line(command, argv, message, capsys):
    module = importlib.import_module(f"warp_kernel.{command}")
    with pytest.raises(SystemExit) as exited:
        module.main(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"python -m warp_kernel.{command}: error: ")
    assert message in err


@pytest.mark.skipif(HAS_GPU, reason="checks what happens without a GPU")
def test_check_command_without_a_gpu_says_so_in_one_line(capsys):
    from warp_kernel import check

    assert check.main(["--no-bench"]) == 2
    out, err = capsys.readouterr()
    assert out == "warp_kernel.check: no CUDA GPU visible; nothing to check.\n" and err == ""


def test_odd_arguments_give_no_traceback_from_the_shell():
    root = os.path.dirname(os.path.dirname(os.path.abspath(warp_kernel.__file__)))
    run = subprocess.run(
        [sys.executable, "-m", "warp_kernel.bench", "--sizes", "1x", "--threads", "0"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and run.stdout == ""
    error = "argument --sizes: '1x' is not BATCHxSIDE, e.g. 1x1024"
    assert run.stderr == f"python -m warp_kernel.bench: error: {error}\n"
