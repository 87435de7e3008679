"""Benchmark of flow_warp, ssim and warp_ssim: every backend against PyTorch in NCHW and in
channels_last layout.

    python -m warp_kernel.bench                       # CPU backends at 1 and 2 threads (+ GPU)
    python -m warp_kernel.bench --ops warp_ssim --sizes 1x1024 --threads 1
    python -m warp_kernel.bench --json bench.json

Per (op, size, threads, backend): "fwd" is an inference forward (torch.no_grad), "fwd+bwd" a
training step: forward with the flow (warp ops) or x (ssim) requiring grad, then backward of
ssim.sum() or of out * g - the way uad.py differentiates the warp. Times are wall-clock
milliseconds over --repeats runs after --warmup runs: the median, the minimum and the spread
(interquartile range). Speedups divide the torch-nchw / torch-cl medians by the backend's.
Inputs: uniform random images, C = 3; a smooth random flow (a 6x6 grid of displacements of up
to 8 px, bicubically upsampled, plus 0.25 px noise), like the deformations of uad.py.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import warp_kernel
from warp_kernel import build, cli, reference

OPS = ("flow_warp", "ssim", "warp_ssim")
SIZES = ("1x256", "1x512", "1x1024", "4x1024")  # batch x side
BUILD_NAMES = {"cpp": "cpu", "cuda": "cuda"}  # backend -> the extension warp_kernel.build loads


def smooth_flow(b, h, w, generator, max_px=8.0):
    """(B, 2, H, W): a 6x6 grid of random displacements upsampled bicubically, plus noise."""
    coarse = (torch.rand(b, 2, 6, 6, generator=generator) * 2 - 1) * max_px
    flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    return (flow + 0.25 * torch.randn(b, 2, h, w, generator=generator)).contiguous()


def make_inputs(size, device, seed=0):
    b, side = (int(v) for v in size.split("x"))
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, side, side, generator=g)
    ref = torch.rand(b, 3, side, side, generator=g)
    flow = smooth_flow(b, side, side, g)
    grad_out = torch.rand(b, 3, side, side, generator=g)
    return [t.to(device) for t in (img, flow, ref, grad_out)]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_step(op, backend, tensors, train):
    """A closure running one forward (train=False) or forward+backward (train=True)."""
    img, flow, ref, grad_out = tensors
    layout = None
    if backend in ("torch-nchw", "torch-cl"):
        layout = backend == "torch-cl"
        impl = "torch"
    else:
        impl = backend
    flow_in = flow.clone().requires_grad_(train)
    x_in = img.clone().requires_grad_(train)

    def run():
        if op == "flow_warp":
            out = (
                reference.flow_warp(img, flow_in)
                if impl == "torch"
                else warp_kernel.flow_warp(img, flow_in, impl=impl)
            )
            if train:
                out.backward(grad_out)
        elif op == "ssim":
            s = (
                reference.ssim(x_in, ref, channels_last=layout)
                if impl == "torch"
                else warp_kernel.ssim(x_in, ref, impl=impl)
            )
            if train:
                s.sum().backward()
        else:
            s, _ = (
                reference.warp_ssim(img, flow_in, ref, channels_last=layout)
                if impl == "torch"
                else warp_kernel.warp_ssim(img, flow_in, ref, impl=impl)
            )
            if train:
                s.sum().backward()
        flow_in.grad = x_in.grad = None

    if train:
        return run

    def run_no_grad():
        with torch.no_grad():
            run()

    return run_no_grad


def time_ms(step, device, repeats, warmup):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4)
    return {"median": statistics.median(times), "min": min(times), "spread": q[2] - q[0]}


def run(ops, sizes, threads, backends, repeats, warmup, log):
    rows = []
    for device_backends, device, thread_counts in (
        ([b for b in backends if b != "cuda"], torch.device("cpu"), threads),
        (["cuda"] if "cuda" in backends else [], torch.device("cuda"), [None]),
    ):
        if not device_backends:
            continue
        # The references run on the same device as the backend they are compared with.
        order = ["torch-nchw", "torch-cl"] + device_backends
        for n in thread_counts:
            if n is not None:
                torch.set_num_threads(n)
            for size in sizes:
                tensors = make_inputs(size, device)
                for op in ops:
                    results = {}
                    for backend in order:
                        fwd = time_ms(
                            make_step(op, backend, tensors, False), device, repeats, warmup
                        )
                        bwd = time_ms(
                            make_step(op, backend, tensors, True), device, repeats, warmup
                        )
                        results[backend] = (fwd, bwd)
                        log(f"  {op} {size} threads={n} {backend}: fwd {fwd['median']:.1f} ms, "
                            f"fwd+bwd {bwd['median']:.1f} ms")  # fmt: skip
                    for backend, (fwd, bwd) in results.items():
                        nchw, cl = results["torch-nchw"], results["torch-cl"]
                        rows.append({
                            "op": op, "size": size, "device": device.type,
                            "threads": n, "backend": backend, "fwd_ms": fwd, "fwd_bwd_ms": bwd,
                            "speedup_fwd_vs_nchw": nchw[0]["median"] / fwd["median"],
                            "speedup_fwd_vs_cl": cl[0]["median"] / fwd["median"],
                            "speedup_fwd_bwd_vs_nchw": nchw[1]["median"] / bwd["median"],
                            "speedup_fwd_bwd_vs_cl": cl[1]["median"] / bwd["median"],
                        })  # fmt: skip
    return rows


def format_table(rows):
    header = (
        "| op | size (BxS^2) | dev | thr | backend | fwd ms: median (min, IQR) "
        "| fwd+bwd ms: median (min, IQR) | fwd+bwd speedup vs nchw / cl | fwd speedup vs nchw / cl |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        f, b = r["fwd_ms"], r["fwd_bwd_ms"]
        lines.append(
            f"| {r['op']} | {r['size']} | {r['device']} | {r['threads'] or '-'} | {r['backend']} "
            f"| {f['median']:.2f} ({f['min']:.2f}, {f['spread']:.2f}) "
            f"| {b['median']:.2f} ({b['min']:.2f}, {b['spread']:.2f}) "
            f"| {r['speedup_fwd_bwd_vs_nchw']:.1f}x / {r['speedup_fwd_bwd_vs_cl']:.1f}x "
            f"| {r['speedup_fwd_vs_nchw']:.1f}x / {r['speedup_fwd_vs_cl']:.1f}x |"
        )
    return "\n".join(lines)


def batch_by_side(text):
    """A --sizes entry: BATCHxSIDE, batch >= 1 and side >= 11 (one SSIM window)."""
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxSIDE, e.g. 1x1024")
    if int(parts[0]) < 1 or int(parts[1]) < warp_kernel.MIN_SSIM_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the batch must be at least 1, the side at least {warp_kernel.MIN_SSIM_SIZE}"
        )
    return text


def main(argv=None):
    parser = cli.Parser(prog="python -m warp_kernel.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument(
        "--sizes", nargs="+", type=batch_by_side, default=list(SIZES),
        help="BATCHxSIDE, e.g. 1x1024",
    )  # fmt: skip
    parser.add_argument("--threads", nargs="+", type=cli.count(1), default=[1, 2])
    parser.add_argument(
        "--backends", nargs="+", choices=["cpp", "cuda"], default=None,
        help="extension backends to time (default: every one that loads here)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=cli.count(4), default=10,
        help="timed runs (at least 4: the spread needs quartiles)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=cli.count(0), default=2)
    parser.add_argument("--json", metavar="FILE", type=cli.new_file, help="also write JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    available = warp_kernel.backends()
    backends = args.backends or [b for b in ("cpp", "cuda") if available[b]]
    for b in backends:
        if b == "cuda" and not torch.cuda.is_available():
            parser.error("backend 'cuda' is not available here: no CUDA GPU is visible")
        if not available[b]:
            parser.error(f"backend {b!r} is not available here: {build.failure(BUILD_NAMES[b])}")
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    threads_before = torch.get_num_threads()
    try:
        rows = run(args.ops, args.sizes, args.threads, backends, args.repeats, args.warmup, log)
    finally:
        torch.set_num_threads(threads_before)

    command = "python -m warp_kernel.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"$ {command.strip()}")
    print(
        f"torch {torch.__version__}, {cpu_name()}, "
        f"{args.repeats} timed runs after {args.warmup} warm-up runs"
    )
    print(format_table(rows))
    if args.json:
        meta = {
            "command": command.strip(),
            "torch": torch.__version__,
            "cpu": cpu_name(),
            "gpu": torch.cuda.get_device_name() if "cuda" in backends else None,
            "repeats": args.repeats,
            "warmup": args.warmup,
        }
        try:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
        except OSError as e:
            print(f"{parser.prog}: error: cannot write {args.json}: {e.strerror}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
