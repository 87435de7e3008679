"""Every GPU correctness check of the CUDA backend, then the GPU benchmark - one command for
whoever has a CUDA GPU (the test suite skips these without one):

    python -m warp_kernel.check                 # checks, then python -m warp_kernel.bench on the GPU
    python -m warp_kernel.check --no-bench
    python -m warp_kernel.check --json bench.json

Exit status 0 when every check passes, 1 when one fails, 2 without a GPU or CUDA extension.
"""

import sys
import traceback

import torch

import warp_kernel
from warp_kernel import bench, build, cli
from warp_kernel.testing import GRAD_CASES, assert_all_close, assert_close, make_inputs
from warp_kernel.testing import run_warp_ssim as warp_ssim_step

DEVICE, IMPL = "cuda", "cuda"  # what is checked (a dry run can point these at cpu / cpp)
PADDINGS = ("border", "reflection")
SHAPES = [(1, 3, 23, 31), (3, 1, 17, 40), (3, 3, 32, 29), (1, 1, 11, 12)]
LARGE_SHAPES = [(2, 3, 130, 257), (1, 3, 1024, 1024)]


def inputs(shape, dtype, **kwargs):
    return make_inputs(shape, dtype=dtype, device=DEVICE, **kwargs)


def check_against_torch(dtype):
    for shape in SHAPES if dtype == torch.float32 else SHAPES + LARGE_SHAPES[:1]:
        for padding in PADDINGS:
            img, flow, ref, gw = inputs(shape, dtype)
            for needs, use_warped in GRAD_CASES.values():
                got = warp_ssim_step(IMPL, img, flow, ref, padding, gw, needs, use_warped)
                want = warp_ssim_step("torch", img, flow, ref, padding, gw, needs, use_warped)
                assert_all_close(got, want, dtype)
            outs = []
            for impl in (IMPL, "torch"):
                i, f = img.clone().requires_grad_(), flow.clone().requires_grad_()
                out = warp_kernel.flow_warp(i, f, padding, impl=impl)
                out.backward(gw)
                outs.append((out.detach(), i.grad, f.grad))
            assert_all_close(*outs, dtype, ssim_first=False)
        x, _, y, _ = inputs(shape, dtype, seed=1)
        outs = []
        for impl in (IMPL, "torch"):
            xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
            s = warp_kernel.ssim(xx, yy, impl=impl)
            (s * torch.arange(1, s.numel() + 1, device=DEVICE, dtype=dtype)).sum().backward()
            outs.append((s.detach(), xx.grad, yy.grad))
        assert_all_close(*outs, dtype)


def check_float32():
    check_against_torch(torch.float32)


def check_float64():
    check_against_torch(torch.float64)


def check_gradcheck():
    img, flow, ref, _ = inputs((2, 2, 12, 13), torch.float64, max_px=4.0)
    img, flow, ref = (t.requires_grad_() for t in (img, flow, ref))
    gc = torch.autograd.gradcheck
    assert gc(lambda x, y: warp_kernel.ssim(x, y, impl=IMPL), (img, ref))
    for pad in PADDINGS:
        assert gc(lambda i, f, p=pad: warp_kernel.flow_warp(i, f, p, impl=IMPL), (img, flow))
        assert gc(
            lambda i, f, r, p=pad: warp_kernel.warp_ssim(i, f, r, p, impl=IMPL), (img, flow, ref)
        )


def check_against_cpp():
    if not warp_kernel.backends()["cpp"]:
        raise RuntimeError(f"C++ extension unavailable: {build.failure('cpu')}")
    img, flow, ref, gw = inputs((2, 3, 64, 80), torch.float32)
    for padding in PADDINGS:
        needs, use_warped = GRAD_CASES["all+warped"]
        got = warp_ssim_step(IMPL, img, flow, ref, padding, gw, needs, use_warped)
        cpu = [t.cpu() for t in (img, flow, ref, gw)]
        want = warp_ssim_step("cpp", *cpu[:3], padding, cpu[3], needs, use_warped)
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
        needs, use_warped = GRAD_CASES["all+warped"]
        truth = warp_ssim_step("torch", img, flow, ref, "border", gw, needs, use_warped)
        f32 = [t.float() for t in (img, flow, ref, gw)]
        got = warp_ssim_step(IMPL, *f32[:3], "border", f32[3], needs, use_warped)
        ref32 = warp_ssim_step("torch", *f32[:3], "border", f32[3], needs, use_warped)
        names = ("ssim", "warped", "grad img", "grad flow", "grad ref")
        for name, a, b, t in zip(names, got, ref32, truth):
            error = float((a.double() - t).abs().max())
            allowed = 2 * float((b.double() - t).abs().max()) + 1e-6 * float(t.abs().max())
            assert error <= allowed, f"{shape} {name}: error {error:.3g} > {allowed:.3g}"


def check_streams_and_devices():
    img, flow, ref, _ = inputs((2, 3, 50, 61), torch.float32)
    want = warp_kernel.warp_ssim(img, flow, ref, impl="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # launches must follow the current stream
        got = warp_kernel.warp_ssim(img, flow, ref, impl="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if torch.cuda.device_count() > 1:  # the device guard: inputs on cuda:1, current device 0
        with torch.cuda.device(0):
            moved = [t.to("cuda:1") for t in (img, flow, ref)]
            got = warp_kernel.warp_ssim(*moved, impl="cuda")
        for a, b in zip(got, want):
            assert a.device.index == 1
            assert_close(a.cpu(), b.cpu())


def check_errors():
    ext = build.load("cuda", warn=False)
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
        warp_kernel.ssim(img, ref.cpu(), impl="cuda")
    except ValueError:
        pass
    else:
        raise AssertionError("mixed devices were accepted")


CHECKS = [
    check_float32, check_float64, check_gradcheck, check_against_cpp, check_identities,
    check_large_images, check_streams_and_devices, check_errors,
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
    if not torch.cuda.is_available():
        print("warp_kernel.check: no CUDA GPU visible; nothing to check.")
        return 2
    if build.load("cuda", warn=False) is None:
        print(f"warp_kernel.check: the CUDA extension is unavailable: {build.failure('cuda')}")
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = 0
    for check in CHECKS:
        try:
            check()
            print(f"PASS {check.__name__}")
        except Exception:  # noqa: BLE001 - report every failing check, then exit 1
            failed += 1
            print(f"FAIL {check.__name__}")
            traceback.print_exc()
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed")
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
