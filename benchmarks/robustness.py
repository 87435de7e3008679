"""Does the protection survive publishing and cheap purifiers? Protect with and without
--robust, then apply each of eval.py's probes for real (unsegment.probes: PIL's JPEG, bicubic
resize, Gaussian blur and median filter, seeded noise, bit-depth reduction) and measure what the
surrogate still sees.

    python benchmarks/robustness.py [PHOTO ...] [--checkpoint sam_vit_b_01ec64.pth]
        [--robust SPEC] [--probes LIST] [--preset no-fidelity] [--steps N] [--tiny]
    python benchmarks/robustness.py --match-pil [PHOTO ...]

For each photo and each probe (default: none, JPEG at quality 95, 85, 75 and 50, a 0.5
downscale-upscale, blur:1, median:3, noise:4, bits:5, jpeg:75+resize:0.5) it prints, for the
attack without and with --robust: the surrogate's feature distance d(f(probed), f(clean))
(higher: the protection survived) and d(f(probed), f(target)) (lower: the features still point
at the target), and the PSNR and SSIM of the probed image against the clean photo; then the
first distance again as one table, probe by photo, "off / robust"; then the attack's seconds
per photo. --match-pil instead prints how far uad.jpeg, uad.resize_round_trip,
uad.gaussian_blur and uad.reduce_bits are from the probes', in grey levels, on each photo.
Without --checkpoint the surrogate has random-init weights (of --model-type, or with --tiny a
small encoder that a CPU runs quickly): the figures then show whether the perturbation's effect
on that network survives publishing, not what a trained SAM does.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
import uad
import unsegment.images
import unsegment.models
import unsegment.probes
import warp_kernel

TINY = dict(embed_dim=64, depth=8, num_heads=2, global_attn_indexes=())  # a fast stand-in
PROBES = "none,jpeg:95,jpeg:85,jpeg:75,jpeg:50,resize:0.5,blur:1,median:3,noise:4,bits:5,"
PROBES += "jpeg:75+resize:0.5"
MATCHED = {  # the probes with a differentiable counterpart in uad, and that counterpart
    "jpeg": uad.jpeg,
    "resize": uad.resize_round_trip,
    "blur": uad.gaussian_blur,
    "bits": uad.reduce_bits,
}


def match_pil(pictures) -> None:
    print(
        "| photo | transformation | mean | 99th percentile | max |  (grey levels from the probe's)"
    )
    print("| --- | --- | --- | --- | --- |")
    for photo, pixels in pictures:
        for how in "jpeg:95,jpeg:85,jpeg:75,jpeg:50,resize:0.5,blur:0.5,blur:1,blur:2,bits:5".split(
            ","
        ):
            ((kind, value),) = unsegment.probes.parse_probe(how)
            ours = MATCHED[kind](uad.to_tensor(pixels), value)
            theirs = unsegment.probes.apply_probe(pixels, how)
            diff = np.abs(uad.to_pixels(ours).astype(int) - theirs.astype(int))
            print(
                f"| {photo} | {how} | {diff.mean():.2f} | {np.percentile(diff, 99):.0f} "
                f"| {diff.max()} |"
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("photos", nargs="*", type=Path, help="default: the example photos")
    p.add_argument("--model-type", default="vit_b", choices=list(unsegment.models.SAM_ARCHS))
    p.add_argument("--checkpoint", type=Path, help="real weights; default: random-init")
    p.add_argument("--tiny", action="store_true", help="a small random-init encoder (CPU)")
    p.add_argument("--robust", default="jpeg:50-95,resize:0.5-1,blur:0.5-1.5,noise:2-6,bits:4-6")
    p.add_argument("--probes", default=PROBES, help="eval.py's --probes (default: %(default)s)")
    p.add_argument("--preset", default="no-fidelity", choices=list(uad.PRESETS))
    p.add_argument("--steps", type=int, help="PGD steps (default: the preset's)")
    p.add_argument("--deform-steps", type=int, help="deformation steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--match-pil", action="store_true", help="compare with PIL's and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = unsegment.models.resolve_device(args.device)
        if args.checkpoint is not None:
            sam, weights = (
                unsegment.models.load_sam(args.model_type, args.checkpoint, device),
                "trained",
            )
        else:
            torch.manual_seed(0)
            arch = TINY if args.tiny else None
            sam = unsegment.models.build_sam(args.model_type, arch).requires_grad_(False).to(device)
            weights = "random-init tiny" if args.tiny else f"random-init {args.model_type}"
        overrides = {k: v for k, v in (("steps", args.steps), ("deform_steps", args.deform_steps))}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        configs = {
            robust
            or "off": uad.preset_config(args.preset, seed=args.seed, robust=robust, **overrides)
            for robust in ("", args.robust)
        }
        probes = unsegment.probes.parse_probes(args.probes)
        photos = args.photos or sorted((ROOT / "examples").glob("*.[jp][pn]g"))
        pictures = [(path.name, unsegment.images.read_image(path).pixels) for path in photos]
    except uad.UADError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.match_pil:
        match_pil([(n, np.repeat(p[..., None], 3, 2) if p.ndim == 2 else p) for n, p in pictures])
        return 0
    first = next(iter(configs.values()))
    warp_kernel.backends()  # builds or loads the extensions before anything is timed
    print(
        f"surrogate {weights} on {device}, {args.threads} thread(s), preset {args.preset} "
        f"({first.deform_steps} deformation + {first.steps} PGD steps), eps 8/255, "
        f"seed {args.seed}, torch {torch.__version__}"
    )
    print("| photo | probe | --robust | d(probed, clean) | d(probed, target) | PSNR dB | SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    features = lambda x: uad.encoder_features(sam, x, first.layers, first.dtype)  # noqa: E731
    seconds = {name: [] for name in configs}
    kept = {}  # (probe, photo, --robust) -> d(probed, clean)
    for photo, pixels in pictures:
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        clean = uad.to_tensor(pixels, device)
        with torch.no_grad():
            f_clean = features(clean)
        for name, config in configs.items():
            start = time.perf_counter()
            adv, target, _ = uad.attack(clean, sam, config)
            seconds[name].append(time.perf_counter() - start)
            protected = uad.to_pixels(uad.quantize(adv, clean, config.eps))
            with torch.no_grad():
                f_target = features(target)
            for how in probes:
                probed = unsegment.probes.apply_probe(protected, how, args.seed, Path(photo).stem)
                out = uad.to_tensor(probed, device)
                with torch.no_grad():
                    f_out = features(out)
                    d_clean = uad.feature_distance(f_out, f_clean).clamp_min(0).item()
                    d_target = uad.feature_distance(f_out, f_target).clamp_min(0).item()
                ssim = warp_kernel.ssim(out, clean).item()
                kept[how, photo, name] = d_clean
                print(
                    f"| {photo} | {how} | {name} | {d_clean:.4f} | {d_target:.4f} "
                    f"| {unsegment.images.psnr(out, clean):.2f} | {ssim:.4f} |",
                    flush=True,
                )
    names = [photo for photo, _ in pictures]
    print("\nd(probed, clean), --robust off / " + args.robust)
    print("| probe | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for how in probes:
        cells = [" / ".join(f"{kept[how, n, r]:.4f}" for r in configs) for n in names]
        print(f"| {how} | " + " | ".join(cells) + " |")
    print(
        "attack seconds per photo: "
        + ", ".join(f"--robust {k}: {np.mean(v):.1f}" for k, v in seconds.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
