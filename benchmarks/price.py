"""Hours to protect a set of images, per preset: an estimate priced from the encoder passes, not
a measurement (docs/scale.md).

    python benchmarks/price.py [--images 1000,1000000] [--gpu-tflops 100]
        [--gpu-pass-seconds FORWARD,FORWARD_BACKWARD]

Each preset's encoder passes per image (uad.encoder_passes, ViT-B surrogate) are priced two ways:

- CPU: at the seconds per pass measured on this project's 2-core machine
  (unsegment.cost.CPU_PASS_SECONDS, docs/performance.md), as the command line's header prices
  them, in hours of that 2-core machine;
- GPU: at --gpu-pass-seconds, the seconds of one feature pass forward and forward+backward that
  benchmarks/gpu.sh measures (attack_cost.py) where a GPU is at hand; without them, from the
  passes' FLOPs (unsegment.cost.CPU_PASS_GFLOPS per forward, a backward counted as two forwards)
  at an assumed sustained --gpu-tflops, which is a guess, not a figure of any GPU.

Hours are summed over processes: N GPUs under torchrun take 1/N of the time each. Loading
models, reading and writing files, and scoring are left out.
"""

import argparse
import sys

import uad
from unsegment import cost

PRESETS = ("paper", "no-fidelity", "aa", "noise")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="1000,1000000", help="set sizes, comma-separated")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--gpu-tflops", type=float, default=100.0, help="assumed sustained TFLOP/s")
    p.add_argument("--gpu-pass-seconds", metavar="F,FB", help="measured seconds per pass")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.images.split(",")]
    measured = args.gpu_pass_seconds is not None
    if measured:
        forward, both = (float(v) for v in args.gpu_pass_seconds.split(","))
    gpu = (
        f"GPU at {forward:g} s / {both:g} s per pass (measured)"
        if measured
        else f"GPU at an assumed {args.gpu_tflops:g} TFLOP/s (a guess, not measured)"
    )
    print(
        f"ViT-B surrogate, {args.dtype}; CPU: hours of {cost.CPU_PASS_MACHINE} at its measured "
        f"seconds per pass; {gpu}; estimates"
    )
    print(
        "| preset | forwards | backwards | "
        + " | ".join(f"{n:,} images, CPU hours | {n:,} images, GPU hours" for n in counts)
        + " |"
    )
    print("|" + " --- |" * (3 + 2 * len(counts)))
    for preset in PRESETS:
        config = uad.preset_config(preset, dtype=args.dtype)
        forwards, backwards = uad.encoder_passes(config)
        cpu_forward, cpu_both = cost.CPU_PASS_SECONDS[args.dtype]  # 2 cores, measured
        cpu_seconds = (forwards - backwards) * cpu_forward + backwards * cpu_both
        if measured:
            gpu_seconds = (forwards - backwards) * forward + backwards * both
        else:
            tflop = cost.CPU_PASS_GFLOPS * (forwards + 2 * backwards) / 1000
            gpu_seconds = tflop / args.gpu_tflops
        cells = []
        for n in counts:
            cells += [f"{cpu_seconds * n / 3600:,.0f}", f"{gpu_seconds * n / 3600:,.1f}"]
        print(f"| `{preset}` | {forwards} | {backwards} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
