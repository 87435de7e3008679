"""What an attack costs on a CPU, estimated before it runs: the header line of the command line.

An attack's encoder passes (uad.encoder_passes) priced by the surrogates' FLOPs (counted on fake
tensors, nothing computed) at the rate measured for SAM ViT-B (benchmarks/attack_cost.py).
"""

import os
import platform

import torch

import uad

# Seconds of one forward and one forward+backward of blocks 1-7 of ViT-B at 1024 on 2 cores
# per encoder dtype (AMD EPYC with AVX512-BF16, SAM's attention; benchmarks/attack_cost.py), and
# the GFLOPs of that forward as `forward_gflops` counts them: the CPU estimate prices every
# surrogate's passes at this rate, on whatever CPU it runs (docs/performance.md, "Cost").
CPU_PASS_SECONDS = {"float32": (6.99, 17.31), "bfloat16": (3.63, 7.42)}
CPU_PASS_GFLOPS = 550.17
CPU_PASS_MACHINE = "2 cores of an AMD EPYC with AVX512-BF16"  # where those seconds were timed


def forward_gflops(surrogate: uad.Surrogate, config: uad.UADConfig) -> float:
    """GFLOPs of one pass computing f through `surrogate` at its input size (matrix products,
    convolutions and attention, as torch.utils.flop_counter counts them), counted on fake
    tensors: nothing is computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    size = surrogate.input_size
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        x = torch.rand(1, 3, size, size, device=surrogate.device)
        with FlopCounterMode(display=False) as counter:
            surrogate.features(x, config)
    return counter.get_total_flops() / 1e9


def cpu_estimate(config: uad.UADConfig, gflops: float, threads: int) -> float:
    """A plain estimate of one image's attack time on a CPU, in seconds: the passes of
    encoder_passes(config) through surrogates whose feature passes make `gflops` GFLOPs in all
    (see forward_gflops), priced at CPU_PASS_SECONDS per CPU_PASS_GFLOPS and shared by the
    threads. The encoders run at their own input size whatever the image's, so neither changes
    the cost. Encoders of small depthwise convolutions (TinyViT) run below that rate. bfloat16
    is priced at the float32 rate on a CPU without native bfloat16 (see native_bfloat16), where
    PyTorch emulates it at a speed not measured here."""
    forwards, backwards = uad.encoder_passes(config)
    forward, both = CPU_PASS_SECONDS[config.dtype if native_bfloat16() else "float32"]
    scale = gflops / CPU_PASS_GFLOPS * 2 / max(1, min(threads, os.cpu_count() or 1))
    return ((forwards - backwards) * forward + backwards * both) * scale


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where --dtype
    bfloat16 runs the encoder about twice as fast (docs/performance.md, "Encoder speed")."""
    try:  # Linux names the instruction sets in the CPU's flags; elsewhere assume not
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model() -> str:
    """This CPU's model name as the system gives it ("AMD EPYC 7B13"), or its architecture."""
    try:  # Linux: "model name" on x86, "Model" or "Hardware" on some ARM boards
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if (
                    key.strip() in ("model name", "Model", "Hardware", "cpu model")
                    and value.strip()
                ):
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "an unknown CPU"
