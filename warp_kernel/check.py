"""Every GPU correctness check of the CUDA backend, then the GPU benchmark - one command for
whoever has a CUDA GPU (the test suite runs the kernels on CPU threads only):

    python -m warp_kernel.check                 # checks, then warp_kernel.bench on the GPU
    python -m warp_kernel.check --no-bench
    python -m warp_kernel.check --json bench.json

Each check prints PASS, FAIL (with its traceback) or SKIP (with the reason: a second GPU, or
the memory a huge image needs), with its time. Besides the backend against PyTorch and
gradcheck, the checks aim at what only a GPU shows: results that differ from run to run, work
launched on another stream than the current one (checked without a device-wide sync), offsets
past 2^31, the size guard, many samples landing on one pixel, and grids beyond 65535 blocks.
Sized to finish, benchmark included, well within 5 minutes on a current GPU (it has not yet run
on one: the tests run these kernels on CPU threads).

The kernels are checked raw: the command sets WARP_KERNEL_SELF_CHECK=0, so that the self-check
of first calls (warp_kernel.self_check) can neither replace a failing kernel nor change what is
launched. check_self_check runs that self-check itself, which must pass on right kernels.

Exit status 0 when every check passes or skips, 1 when one fails, 2 without a GPU or without the
CUDA extension (one line says which).
"""

import contextlib
import os
import sys
import time
import traceback

import torch

import warp_kernel
from warp_kernel import bench, build, cli, self_check
from warp_kernel.testing import (
    GRAD_CASES,
    assert_all_close,
    assert_far_corner_matches,
    converging_flow,
    make_inputs,
    run_flow_warp,
    run_ssim,
    run_warp_ssim,
)

DEVICE, IMPL = (
    "cuda",
    "cuda",
)  # what is checked (the tests point these at cpu / cpp or the emulation)
PADDINGS = ("border", "reflection")
SHAPES = [(1, 3, 23, 31), (3, 1, 17, 40), (3, 3, 32, 29), (1, 1, 11, 12)]
LARGE_SHAPES = [(2, 3, 130, 257), (1, 3, 1024, 1024)]
ALL = GRAD_CASES["all+warped"]


class Skip(Exception):
    """A check that cannot run here (the reason is the message)."""


def extension():
    """The extension module the checks that call it directly use."""
    return build.load("cuda", warn=False)


def inputs(shape, dtype, **kwargs):
    return make_inputs(shape, dtype=dtype, device=DEVICE, **kwargs)


def check_against_torch(dtype):
    for shape in SHAPES if dtype == torch.float32 else SHAPES + LARGE_SHAPES[:1]:
        for padding in PADDINGS:
            img, flow, ref, gw = inputs(shape, dtype)
            for needs, use_warped in GRAD_CASES.values():
                got = run_warp_ssim(IMPL, img, flow, ref, padding, gw, needs, use_warped)
                want = run_warp_ssim("torch", img, flow, ref, padding, gw, needs, use_warped)
                assert_all_close(got, want, dtype)
            got = run_flow_warp(IMPL, img, flow, gw, padding)
            assert_all_close(got, run_flow_warp("torch", img, flow, gw, padding), dtype, False)
        x, _, y, _ = inputs(shape, dtype, seed=1)
        assert_all_close(run_ssim(IMPL, x, y), run_ssim("torch", x, y), dtype)


def check_float32():
    check_against_torch(torch.float32)


def check_float64():
    check_against_torch(torch.float64)


def check_gradcheck():
    """Includes gradcheck's test that the backward gives the same result twice."""
    img, flow, ref, _ = inputs((2, 2, 12, 13), torch.float64, max_px=4.0)
    img, flow, ref = (t.requires_grad_() for t in (img, flow, ref))
    gc = torch.autograd.gradcheck
    assert gc(lambda x, y: warp_kernel.ssim(x, y, impl=IMPL), (img, ref))
    for pad in PADDINGS:
        assert gc(lambda i, f, p=pad: warp_kernel.flow_warp(i, f, p, impl=IMPL), (img, flow))
        assert gc(
            lambda i, f, r, p=pad: warp_kernel.warp_ssim(i, f, r, p, impl=IMPL), (img, flow, ref)
        )


def check_self_check():
    """The self-check of first calls passes for every op and dtype: it must not replace right
    kernels (its reference runs in float64 on the CPU, so TF32 and GPU libraries play no part)."""
    ext = warp_kernel._extension(IMPL, DEVICE)
    for op in self_check.OPS:
        for dtype in (torch.float32, torch.float64):
            why = self_check.run(op, ext, dtype, torch.device(DEVICE))
            assert why is None, f"{op} in {dtype}: {why}"


def check_determinism(shape=(2, 3, 256, 256), runs=10):
    """The same bits on every run, under torch.use_deterministic_algorithms(True): the image
    gradient of a flow that sends half the samples to one pixel (a scatter with atomicAdd would
    add them in a different order each time) and the SSIM, a sum over blocks."""
    b, _, h, w = shape
    for dtype in (torch.float32, torch.float64):
        img, flow, ref, gw = inputs(shape, dtype)
        flow = 0.5 * flow + 0.5 * converging_flow(b, h, w, w / 2 + 0.3, h / 3 + 0.6, DEVICE)
        flow = flow.to(dtype)
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            results = [
                run_flow_warp(IMPL, img, flow, gw, "border")
                + run_warp_ssim(IMPL, img, flow, ref, "reflection", gw, *ALL)
                for _ in range(runs)
            ]
        finally:
            torch.use_deterministic_algorithms(was)
        for run in results[1:]:
            for i, (a, b_) in enumerate(zip(run, results[0])):
                assert torch.equal(a, b_), f"{dtype} result {i} changed between runs"


def check_many_samples_on_one_pixel(shape=(1, 3, 512, 512)):
    """Every output pixel samples the same 2 x 2 pixels, then the last pixel (past the corner):
    runs of H * W samples, summed by one thread each."""
    b, _, h, w = shape
    img, _, ref, gw = inputs(shape, torch.float64)
    for x, y in ((6.05, 4.05), (w + 3.0, h + 7.0)):
        flow = converging_flow(b, h, w, x, y, DEVICE)
        for padding in PADDINGS:
            got = run_flow_warp(IMPL, img, flow, gw, padding)
            want = run_flow_warp("torch", img, flow, gw, padding)
            assert_all_close(got, want, torch.float64, False)
            got = run_warp_ssim(IMPL, img, flow, ref, padding, gw, *ALL)
            assert_all_close(
                got, run_warp_ssim("torch", img, flow, ref, padding, gw, *ALL), torch.float64
            )


def check_against_cpp():
    if not warp_kernel.backends()["cpp"]:
        raise Skip(f"C++ extension unavailable: {build.failure('cpu')}")
    img, flow, ref, gw = inputs((2, 3, 64, 80), torch.float32)
    for padding in PADDINGS:
        got = run_warp_ssim(IMPL, img, flow, ref, padding, gw, *ALL)
        cpu = [t.cpu() for t in (img, flow, ref, gw)]
        want = run_warp_ssim("cpp", *cpu[:3], padding, cpu[3], *ALL)
        assert_all_close([t.cpu() for t in got], want, torch.float32)


def check_identities():
    img, flow, _, _ = inputs((2, 3, 40, 33), torch.float32)
    for padding in PADDINGS:
        zero = torch.zeros_like(flow)
        assert torch.equal(warp_kernel.flow_warp(img, zero, padding, impl=IMPL), img)
        s, w = warp_kernel.warp_ssim(img, zero, img, padding, impl=IMPL)
        assert torch.equal(w, img)
        torch.testing.assert_close(s, torch.ones(2, device=DEVICE), rtol=0, atol=1e-5)
    shift = torch.zeros_like(flow)
    shift[:, 0], shift[:, 1] = 3, -2
    out = warp_kernel.flow_warp(img, shift, impl=IMPL)
    torch.testing.assert_close(out[..., 2:, :-3], img[..., :-2, 3:], rtol=0, atol=1e-6)


def check_large_images():
    """In float32 the sample positions of a 1024-px image resolve only 6e-5 px, and the SSIM
    gradient of small entries cancels; neither float32 implementation then matches the other
    to 1e-4. Both are measured against float64 instead: the backend's error must not exceed
    twice PyTorch's own float32 error (plus 1e-6 of the largest entry)."""
    for shape in LARGE_SHAPES:
        img, flow, ref, gw = inputs(shape, torch.float64, max_px=8.0)
        truth = run_warp_ssim("torch", img, flow, ref, "border", gw, *ALL)
        f32 = [t.float() for t in (img, flow, ref, gw)]
        got = run_warp_ssim(IMPL, *f32[:3], "border", f32[3], *ALL)
        ref32 = run_warp_ssim("torch", *f32[:3], "border", f32[3], *ALL)
        names = ("ssim", "warped", "grad img", "grad flow", "grad ref")
        for name, a, b, t in zip(names, got, ref32, truth):
            error = float((a.double() - t).abs().max())
            allowed = 2 * float((b.double() - t).abs().max()) + 1e-6 * float(t.abs().max())
            assert error <= allowed, f"{shape} {name}: error {error:.3g} > {allowed:.3g}"


def check_side_stream():
    """Work queued on a side stream and read back on it, with no device-wide sync: the inputs
    are NaN on the default stream and get their values on the side stream only after 50 ms of
    sleep there, so a kernel launched on any other stream reads NaN or finds nothing written."""
    img, flow, ref, gw = inputs((2, 3, 50, 61), torch.float32)
    want = run_flow_warp(IMPL, img, flow, gw, "border")
    want += run_warp_ssim(IMPL, img, flow, ref, "border", gw, *ALL)
    copies = [torch.full_like(t, float("nan")) for t in (img, flow, ref, gw)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # about 50 ms of GPU clock cycles, on the side stream
        for copy, t in zip(copies, (img, flow, ref, gw)):
            copy.copy_(t)
        got = run_flow_warp(IMPL, copies[0], copies[1], copies[3], "border")
        got += run_warp_ssim(IMPL, *copies[:3], "border", copies[3], *ALL)
        got = [t.cpu() for t in got]  # waits for the side stream alone
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b.cpu()), f"result {i} differs on a side stream"


def check_device_guard():
    """Inputs on cuda:1 while cuda:0 is current."""
    if torch.cuda.device_count() < 2:
        raise Skip("needs a second GPU")
    img, flow, ref, _ = inputs((2, 3, 50, 61), torch.float32)
    want = warp_kernel.warp_ssim(img, flow, ref, impl=IMPL)
    with torch.cuda.device(0):
        got = warp_kernel.warp_ssim(*(t.to("cuda:1") for t in (img, flow, ref)), impl=IMPL)
    for a, b in zip(got, want):
        assert a.device.index == 1
        assert torch.equal(a.cpu(), b.cpu())


def check_batches_and_heights_beyond_65535():
    """70000 images (the batch is folded into grid.x; grid.y and z stop at 65535), then an
    image 1.1 million rows high (68750 rows of tiles)."""
    img, flow, ref, gw = inputs((70000, 1, 11, 11), torch.float32, max_px=3.0)
    got = run_flow_warp(IMPL, img, flow, gw, "border")
    assert_all_close(got, run_flow_warp("torch", img, flow, gw, "border"), torch.float32, False)
    got = run_warp_ssim(IMPL, img, flow, ref, "border", gw, *ALL)
    want = run_warp_ssim("torch", img, flow, ref, "border", gw, *ALL)
    assert_all_close(got, want, torch.float32)
    assert_far_corner_matches(extension(), (1, 2, 1_100_000, 64), DEVICE)


def needs_memory(gigabytes):
    free = torch.cuda.mem_get_info()[0] / 2**30
    if free < gigabytes:
        raise Skip(f"needs {gigabytes} GB of free GPU memory, {free:.0f} GB free")


def check_offsets_past_2_31():
    """A 26800 x 26800 image: the gradient's four partial maps span 4 * 26800^2 > 2^31 values
    (35 GB of tensors in all)."""
    needs_memory(40)
    assert_far_corner_matches(extension(), (1, 1, 26800, 26800), DEVICE)


def check_size_guard():
    """A tensor of 2^31 values or more is refused with a clear error (the kernels index one
    tensor with 32-bit ints)."""
    needs_memory(10)
    big = torch.empty((1, 1, 46341, 46341), device=DEVICE)
    try:
        extension().ssim_forward(big, big, 1.0, False, False)
    except RuntimeError as e:
        assert f"x is too large ({46341**2} elements" in str(e), str(e)
    else:
        raise AssertionError("a tensor of 2^31 values was accepted")


def check_errors():
    ext = extension()
    img, flow, ref, _ = inputs((1, 3, 16, 16), torch.float32)
    for call, message in [
        (lambda: ext.flow_warp_forward(img.cpu(), flow.cpu(), 0), "CUDA tensor"),
        (lambda: ext.ssim_forward(img, ref.cpu(), 1.0, False, False), "same device|CUDA tensor"),
        (lambda: ext.flow_warp_forward(img.transpose(-1, -2), flow, 0), "contiguous"),
        (lambda: ext.flow_warp_forward(img.half(), flow.half(), 0), "float32 or float64"),
    ]:
        try:
            call()
        except RuntimeError as e:
            assert any(m in str(e) for m in message.split("|")), str(e)
        else:
            raise AssertionError(f"no error for a bad input ({message})")
    try:
        warp_kernel.ssim(img, ref.cpu(), impl=IMPL)
    except ValueError:
        pass
    else:
        raise AssertionError("mixed devices were accepted")


CHECKS = [
    check_float32, check_float64, check_gradcheck, check_self_check, check_determinism,
    check_many_samples_on_one_pixel, check_against_cpp, check_identities, check_large_images,
    check_side_stream, check_device_guard, check_batches_and_heights_beyond_65535,
    check_offsets_past_2_31, check_size_guard, check_errors,
]  # fmt: skip


def main(argv=None):
    parser = cli.Parser(
        prog="python -m warp_kernel.check", description="GPU checks and benchmark of warp_kernel."
    )
    parser.add_argument("--no-bench", action="store_true", help="only the correctness checks")
    parser.add_argument(
        "--json", metavar="FILE", type=cli.new_file, help="write the benchmark results as JSON"
    )
    args = parser.parse_args(argv)
    with self_check_off():
        return run_checks(args)


@contextlib.contextmanager
def self_check_off():
    """WARP_KERNEL_SELF_CHECK=0 within the block, as it was after it: the raw kernels."""
    previous = os.environ.get(warp_kernel.SELF_CHECK_ENV)
    os.environ[warp_kernel.SELF_CHECK_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[warp_kernel.SELF_CHECK_ENV]
        else:
            os.environ[warp_kernel.SELF_CHECK_ENV] = previous


def run_checks(args):
    if not torch.cuda.is_available():
        print("warp_kernel.check: no CUDA GPU visible; nothing to check.")
        return 2
    if extension() is None:
        print(f"warp_kernel.check: the CUDA extension is unavailable: {build.failure('cuda')}")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = skipped = 0
    start = time.perf_counter()
    for check in CHECKS:
        began = time.perf_counter()
        try:
            check()
            torch.cuda.synchronize()
            outcome = "PASS"
        except Skip as reason:
            skipped += 1
            outcome = f"SKIP ({reason})"
        except Exception:  # noqa: BLE001 - report every failing check, then exit 1
            failed += 1
            outcome = "FAIL"
            traceback.print_exc()
        torch.cuda.empty_cache()
        print(f"{outcome} {check.__name__} ({time.perf_counter() - began:.1f} s)", flush=True)
    passed, seconds = len(CHECKS) - failed - skipped, time.perf_counter() - start
    print(f"{passed} passed, {skipped} skipped, {failed} failed in {seconds:.0f} s")
    if failed:
        return 1
    if not args.no_bench:
        bench_args = ["--backends", "cuda", "--threads", "1"]
        if args.json:
            bench_args += ["--json", args.json]
        bench.main(bench_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
