"""Does the attack stay the same attack when the encoder runs in bfloat16?

    python benchmarks/precision.py [--steps 3] [--threads 2] [--attention sam] [PHOTO ...]

On each photo (default: the four example photos, each at its own size), runs the
`no-fidelity` preset (its 40 deformation steps need no encoder) with --steps PGD steps on a
random-init ViT-B at 1024 (the same weights for both), once with the encoder in float32 and
once under bfloat16 autocast, alternating photo by photo. For each it saves the protected
image as PNG (unsegment.images.write_image, re-read from disk) and prints:
  - the L-infinity distance of the saved file from the photo, which must be within eps;
  - stage 2's objective d(f(x), f(target)) - d(f(x), f(image)) at every step, as each dtype
    computes it, and their ratio step by step (the trend);
  - d(f(saved), f(photo)) measured by the float32 encoder for both files, and its ratio
    bfloat16 / float32;
  - each attack's seconds.
With --steps 3 that is 4 photos x (6 passes in float32 + 6 in bfloat16 + 3 float32
measurements), under 10 minutes on 2 threads at the pass times of docs/performance.md.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
import uad
import unsegment.images
import unsegment.models

DTYPES = ("float32", "bfloat16")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("photos", nargs="*", type=Path, help="default: the example photos")
    p.add_argument("--steps", type=int, default=3, help="PGD steps of stage 2 [3]")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--attention", default=uad.UADConfig().attention, choices=uad.ATTENTIONS)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    photos = args.photos or sorted((ROOT / "examples").glob("*.[jp][pn]g"))
    torch.manual_seed(0)
    sam = unsegment.models.build_sam("vit_b").requires_grad_(False).to(device)
    configs = {
        dtype: uad.preset_config(
            "no-fidelity", steps=args.steps, dtype=dtype, attention=args.attention
        )
        for dtype in DTYPES
    }
    eps = configs["float32"].eps
    print(
        f"vit_b random-init, no-fidelity preset with {args.steps} PGD steps, eps "
        f"{eps * 255:g}/255, attention {args.attention}, {args.threads} thread(s), {device}, "
        f"torch {torch.__version__}",
        flush=True,
    )

    def float32_features(x):
        with torch.no_grad():
            return uad.encoder_features(
                sam, x, configs["float32"].layers, "float32", args.attention
            )

    ratios, worst = [], {dtype: 0 for dtype in DTYPES}
    with tempfile.TemporaryDirectory() as folder:
        for path in photos:
            picture = unsegment.images.read_image(path)
            image = uad.to_tensor(picture.pixels, device)
            f_photo = float32_features(image)
            distance, curves = {}, {}
            for dtype in DTYPES:
                losses = []

                def progress(stage, step, total, loss=None, losses=losses):
                    if stage == "simulate" and loss is not None:
                        losses.append(loss)

                start = time.perf_counter()
                adv, _, _ = uad.attack(image, sam, configs[dtype], progress)
                seconds = time.perf_counter() - start
                pixels = uad.to_pixels(uad.quantize(adv, image, eps))
                saved_path = Path(folder) / f"{path.stem}-{dtype}.png"
                saved_picture = unsegment.images.write_image(
                    saved_path, unsegment.images.Picture(pixels), overwrite=True
                )
                saved = uad.to_tensor(saved_picture.pixels, device)
                linf = round((saved - image).abs().max().item() * 255)
                worst[dtype] = max(worst[dtype], linf)
                within = "within" if linf <= round(eps * 255) else "OUTSIDE"
                distance[dtype] = uad.feature_distance(float32_features(saved), f_photo).item()
                curves[dtype] = losses
                print(
                    f"{path.name} {picture.pixels.shape[1]}x{picture.pixels.shape[0]} {dtype}: "
                    f"saved file L-inf {linf}/255 ({within} eps), objective per step "
                    f"{', '.join(f'{v:+.5f}' for v in losses)}, d(f32(saved), f32(photo)) "
                    f"{distance[dtype]:.5f}, {seconds:.0f} s",
                    flush=True,
                )
            steps = np.array(curves["bfloat16"]) / np.array(curves["float32"])
            ratio = distance["bfloat16"] / distance["float32"]
            ratios.append(ratio)
            print(
                f"{path.name}: objective bfloat16 / float32 per step "
                f"{', '.join(f'{v:.3f}' for v in steps)}; final distance bfloat16 / float32 "
                f"{ratio:.3f}",
                flush=True,
            )
    print(
        f"all photos: largest L-inf of a saved file {worst['float32']}/255 (float32), "
        f"{worst['bfloat16']}/255 (bfloat16), eps {eps * 255:g}/255; final distance bfloat16 / "
        f"float32 {min(ratios):.3f} to {max(ratios):.3f} (mean {np.mean(ratios):.3f})"
    )
    return 0 if max(worst.values()) <= round(eps * 255) else 1


if __name__ == "__main__":
    sys.exit(main())
