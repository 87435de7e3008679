"""What stage 1 makes of the example photos: how far the target is from the photo, and how
smooth the flow that warps it is.

    python benchmarks/deformation.py [--preset no-fidelity] [--seed 0] [--size WxH] [PHOTO ...]

Runs the deformation (stage 1) of the preset on each photo at its own resolution and prints
SSIM(target, photo), and of the applied flow (the mosaic of the K fields, seams included, in
the units of L_C): its total variation per control-grid block, its variance, and the largest
jump between neighbouring pixels in pixels at SAM's 1024 scale. Without the fidelity term no
encoder is needed; with it (--preset paper) a random-init ViT-B stands in for the surrogate.

--size WxH (2250x1500: SA-1B's size) first resizes each photo to WxH with PIL's bicubic filter,
and the table says so (the example photos are 640 px or less, so this upscales them): L_D's SSIM
runs at the image's resolution while L_C is in 1024-scale units, so this shows whether their
balance holds at SA-1B's size.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
import eval as ev
import uad
import unsegment.images
import unsegment.models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("photos", nargs="*", type=Path, help="default: the example photos")
    p.add_argument("--preset", default="no-fidelity", choices=list(uad.PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--size", type=ev.image_size, metavar="WxH", help="resize each photo first")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = args.photos or sorted((ROOT / "examples").glob("*.[jp][pn]g"))
    config = uad.preset_config(args.preset, seed=args.seed)
    surrogate, sam = None, None
    if uad.uses_fidelity(config):
        torch.manual_seed(0)
        sam = unsegment.models.build_sam("vit_b").requires_grad_(False)
        surrogate = uad.Ensemble([uad.Surrogate.of(sam)], config, uad.Stats())
    resized = "" if args.size is None else ", each photo resized (bicubic) to %dx%d" % args.size
    print(f"preset {args.preset}, seed {args.seed}, {args.threads} thread(s){resized}")
    print("| photo | size | target SSIM | flow TV | flow variance | largest jump (px at 1024) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in photos:
        try:
            pixels = unsegment.images.read_image(path).pixels
        except uad.UADError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        name = path.name
        if args.size is not None and pixels.shape[1::-1] != args.size:
            name += " (from %dx%d)" % pixels.shape[1::-1]
            pixels = np.asarray(Image.fromarray(pixels).resize(args.size, Image.BICUBIC))
        image = uad.to_tensor(pixels)
        f_image = None
        if sam is not None:
            with torch.no_grad():
                f_image = surrogate(image)
        gen = torch.Generator().manual_seed(config.seed)
        _, ssim, flow = uad.deform(image, f_image, surrogate, config, gen)
        u = flow / (1024 / config.control_points)
        per_block = max(flow.shape[-2:]) / config.control_points
        tv = ((u.diff(dim=-2).abs().mean() + u.diff(dim=-1).abs().mean()) * per_block).item()
        var = u.flatten(2).var(-1).sum().item()
        jump = max(flow.diff(dim=-2).abs().max().item(), flow.diff(dim=-1).abs().max().item())
        h, w = image.shape[-2:]
        print(f"| {name} | {w}x{h} | {ssim.item():.3f} | {tv:.3f} | {var:.4f} | {jump:.1f} " "|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
