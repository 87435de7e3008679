"""What one protected image costs: encoder passes per preset and seconds per image.

    python benchmarks/attack_cost.py [--model-type vit_b] [--size 1024] [--threads 2] [--full]

Builds a random-init SAM (no checkpoint needed: the cost does not depend on the weights) and
runs short attacks of each preset, whose differences give the passes and seconds of one step of
each stage; the default step counts scale them up to one image. --full also times complete
attacks. The reference code's cost is its 237 forwards and 196 backwards of the whole encoder,
each timed here.
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


def timed_attack(image, sam, config) -> tuple:
    """(seconds, forwards, backwards) of one uad.attack run."""
    start = time.perf_counter()
    stats = uad.attack(image, sam, config)[2]
    return time.perf_counter() - start, stats.forwards, stats.backwards


def per_image(image, sam, preset: str) -> tuple:
    """(seconds, forwards, backwards) per image at the default step counts, from three short runs.

    Runs of (1, 1), (2, 1) and (1, 2) deformation and PGD steps give the cost of one step of
    each stage by difference, and the fixed cost; the default counts then scale them up.
    """
    full = uad.preset_config(preset)
    a = timed_attack(image, sam, uad.preset_config(preset, deform_steps=1, steps=1))
    b = timed_attack(image, sam, uad.preset_config(preset, deform_steps=2, steps=1))
    c = timed_attack(image, sam, uad.preset_config(preset, deform_steps=1, steps=2))
    return tuple(
        a[i] + (full.deform_steps - 1) * (b[i] - a[i]) + (full.steps - 1) * (c[i] - a[i])
        for i in range(3)
    )


def full_encoder_seconds(sam, image, backward: bool) -> float:
    """One pass of the whole image encoder (all blocks and the neck), as the reference runs it."""
    x = uad.sam_input(image, sam).requires_grad_(backward)
    start = time.perf_counter()
    out = sam.image_encoder(x)
    if backward:
        out.sum().backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-type", default="vit_b", choices=list(uad.SAM_ARCHS))
    p.add_argument("--size", type=int, default=1024, help="side of the (square) test photo")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--full", action="store_true", help="also time complete attacks")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image
    from segment_anything.build_sam import _build_sam

    a = uad.SAM_ARCHS[args.model_type]
    torch.manual_seed(0)
    sam = _build_sam(a["embed_dim"], a["depth"], a["num_heads"], list(a["global_attn_indexes"]))
    sam = sam.eval().requires_grad_(False)
    photo = Image.open(Path(__file__).resolve().parent.parent / "examples" / "astronaut.png")
    image = uad.to_tensor(np.asarray(photo.convert("RGB").resize((args.size, args.size))))
    print(
        f"{args.model_type} random-init, {args.size}x{args.size} photo, {args.threads} threads, "
        f"torch {torch.__version__}, warp_kernel {warp_kernel.backends()}",
        flush=True,
    )

    depth = len(sam.image_encoder.blocks)
    rows = []
    for preset in uad.PRESETS:
        secs, fwd, bwd = per_image(image, sam, preset)
        blocks = f"{max(uad.UADConfig().layers) + 1} of {depth}, no neck"
        rows.append(f"| unsegment `{preset}` | {fwd:.0f} | {bwd:.0f} | {blocks} | {secs:.0f} |")
        if args.full:
            secs = timed_attack(image, sam, uad.preset_config(preset))[0]
            rows.append(f"| unsegment `{preset}`, complete run | | | | {secs:.0f} |")
        print(rows[-1], flush=True)
    full_encoder_seconds(sam, image, False)  # warm-up
    f = full_encoder_seconds(sam, image, False)
    fb = full_encoder_seconds(sam, image, True)
    fwd, bwd = REFERENCE_PASSES
    rows.append(
        f"| reference code (timed passes x its counts) | {fwd} | {bwd} | "
        f"{depth} of {depth} + neck | {fwd * f + bwd * (fb - f):.0f} |"
    )
    print(f"\nfull encoder: forward {f:.2f} s, forward+backward {fb:.2f} s\n")
    print("| attack | encoder forwards | encoder backwards | blocks run | CPU s per image |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
