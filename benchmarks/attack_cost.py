"""What one protected image costs: encoder passes per preset and CPU seconds per image.

    python benchmarks/attack_cost.py [--model-type vit_b] [--size 1024] [--threads 2] [--full]

Takes the encoder passes of each preset at the default step counts from uad.encoder_passes
(a test checks them against the passes an attack counts). Then times, on a random-init SAM of --model-type (the cost does not depend on the weights), one
feature forward (blocks 0..6), one feature forward+backward, the non-encoder work of one
deformation step (warp + SSIM + flow regulariser + Adam), and the whole encoder's forward and
forward+backward. Seconds per image = passes x timed seconds per pass, plus the deformation
steps' own work; the reference code's cost is its 237 forwards and 196 backwards of the whole
encoder priced the same way. --full also times complete attacks of each preset.

    python benchmarks/attack_cost.py --surrogates vit_b,sam2.1_t,mobile_sam [--threads 2]

prices each surrogate instead (random-init, from its package's builder; see `surrogate_costs`).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import uad  # noqa: E402
import warp_kernel  # noqa: E402

REFERENCE_PASSES = (237, 196)  # full-encoder forwards, backwards per image in the authors' code


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def surrogate_costs(names, image: torch.Tensor, repeats: int) -> None:
    """Prints, per surrogate: the blocks its f runs, the GFLOPs of that forward (what uad.py's
    CPU estimate prices), CPU seconds of one feature forward and one forward+backward to the
    image at the encoder's input size (1024 for every released model), and the encoder seconds
    per image of each preset (its passes from uad.encoder_passes, through this surrogate; an
    ensemble costs the sum of its members' rows)."""
    config = uad.UADConfig()
    passes = {
        preset: uad.encoder_passes(uad.preset_config(preset)) for preset in ("paper", "no-fidelity")
    }
    print(
        "| surrogate | family | blocks run | GFLOPs per forward | forward s | forward+backward s "
        "| `paper` encoder s per image | `no-fidelity` encoder s per image |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        torch.manual_seed(0)
        surrogate = uad.Surrogate.of(uad.build_model(name).eval().requires_grad_(False), name)

        def features(backward: bool):
            x = image.clone().requires_grad_(backward)
            f = surrogate.features(x, config)
            if backward:
                sum(v.sum() for v in f).backward()

        with torch.no_grad():
            t_f = median_seconds(lambda: features(False), repeats)
        t_fb = median_seconds(lambda: features(True), repeats)
        per_image = [fwd * t_f + bwd * (t_fb - t_f) for fwd, bwd in passes.values()]
        print(
            f"| {name} | {surrogate.family} | {max(surrogate.blocks(config)) + 1} of "
            f"{surrogate.depth}, no neck | {uad.forward_gflops(surrogate, config):.0f} "
            f"| {t_f:.2f} | {t_fb:.2f} | {per_image[0]:.0f} | {per_image[1]:.0f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-type", default="vit_b", choices=list(uad.SAM_ARCHS))
    p.add_argument("--size", type=int, default=1024, help="side of the (square) test photo")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=2, help="timed runs per pass (median)")
    p.add_argument("--full", action="store_true", help="also time complete attacks")
    p.add_argument(
        "--surrogates", metavar="NAME,..", help="price these surrogates (uad.py --surrogate names)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image

    passes = {preset: uad.encoder_passes(uad.preset_config(preset)) for preset in uad.PRESETS}
    torch.manual_seed(0)
    sam = uad.build_sam(args.model_type).requires_grad_(False)
    photo = Image.open(Path(__file__).resolve().parent.parent / "examples" / "astronaut.png")
    image = uad.to_tensor(np.asarray(photo.convert("RGB").resize((args.size, args.size))))
    if args.surrogates:
        print(f"{args.size}x{args.size} photo, {args.threads} threads, torch {torch.__version__}")
        return surrogate_costs(args.surrogates.split(","), image, args.repeats)
    print(
        f"{args.model_type} random-init, {args.size}x{args.size} photo, {args.threads} threads, "
        f"torch {torch.__version__}, warp_kernel backends {warp_kernel.backends()}",
        flush=True,
    )
    layers = uad.UADConfig().layers

    def features(backward: bool):
        x = image.clone().requires_grad_(backward)
        f = uad.encoder_features(sam, x, layers)
        if backward:
            sum(v.sum() for v in f).backward()

    def whole_encoder(backward: bool):
        x = uad.sam_input(image, sam).requires_grad_(backward)
        out = sam.image_encoder(x)
        if backward:
            out.sum().backward()

    with torch.no_grad():
        t_f = median_seconds(lambda: features(False), args.repeats)
    t_fb = median_seconds(lambda: features(True), args.repeats)
    steps = 5
    config = uad.preset_config("no-fidelity", deform_steps=steps)  # no encoder in its stage 1
    gen = torch.Generator().manual_seed(0)
    t_deform = (
        median_seconds(lambda: uad.deform(image, None, None, config, gen, None), args.repeats)
        / steps
    )
    with torch.no_grad():
        t_ef = median_seconds(lambda: whole_encoder(False), args.repeats)
    t_efb = median_seconds(lambda: whole_encoder(True), args.repeats)
    print(
        f"features (blocks 0..{max(layers)}): forward {t_f:.2f} s, forward+backward {t_fb:.2f} s; "
        f"whole encoder: forward {t_ef:.2f} s, forward+backward {t_efb:.2f} s; "
        f"one deformation step without the encoder {1000 * t_deform:.0f} ms",
        flush=True,
    )

    depth = len(sam.image_encoder.blocks)
    print("| attack | encoder forwards | encoder backwards | blocks run | CPU s per image |")
    print("| --- | --- | --- | --- | --- |")
    for preset, (fwd, bwd) in passes.items():
        full = uad.preset_config(preset)
        secs = fwd * t_f + bwd * (t_fb - t_f) + full.deform_steps * t_deform
        print(
            f"| unsegment `{preset}` | {fwd} | {bwd} | {max(layers) + 1} of {depth}, no neck "
            f"| {secs:.0f} |",
            flush=True,
        )
        if args.full:
            start = time.perf_counter()
            uad.attack(image, sam, full)
            print(
                f"| unsegment `{preset}`, complete run | | | | {time.perf_counter() - start:.0f} |"
            )
    fwd, bwd = REFERENCE_PASSES
    print(
        f"| reference code | {fwd} | {bwd} | {depth} of {depth} + neck "
        f"| {fwd * t_ef + bwd * (t_efb - t_ef):.0f} |"
    )


if __name__ == "__main__":
    main()
