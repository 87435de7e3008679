"""Does the protection survive publishing? Protect with and without --robust, then publish for
real (PIL JPEG, PIL bicubic downscale and upscale) and measure what the surrogate still sees.

    python benchmarks/robustness.py [PHOTO ...] [--checkpoint sam_vit_b_01ec64.pth]
        [--robust jpeg:50-95,resize:0.5-1] [--preset no-fidelity] [--steps N] [--tiny]
    python benchmarks/robustness.py --match-pil [PHOTO ...]

For each photo and each way of publishing (none, JPEG at quality 95, 85, 75 and 50, a 0.5
downscale-upscale) it prints, for the attack without and with --robust: the surrogate's
feature distance d(f(published), f(clean)) (higher: the protection survived) and
d(f(published), f(target)) (lower: the features still point at the target), and the PSNR and
SSIM of the published file against the clean photo; then the attack's seconds per photo.
--match-pil instead prints how far uad.jpeg and uad.resize_round_trip are from PIL's own, in
grey levels, on each photo.
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
import eval as ev
import uad
import unsegment.images
import unsegment.models
import warp_kernel

TINY = dict(embed_dim=64, depth=8, num_heads=2, global_attn_indexes=())  # a fast stand-in
PUBLISHING = ["none", "jpeg 95", "jpeg 85", "jpeg 75", "jpeg 50", "resize 0.5"]


def publish(pixels: np.ndarray, how: str) -> np.ndarray:
    """Real publishing with PIL, in memory (eval.py's probe): (H, W, 3) uint8 -> the same."""
    kind, _, value = how.partition(" ")
    if kind == "jpeg":
        return ev.degrade(pixels, jpeg=int(value))
    if kind == "resize":
        return ev.degrade(pixels, resize=float(value))
    return pixels


def match_pil(pictures) -> None:
    print("| photo | transformation | mean | 99th percentile | max |  (grey levels from PIL's)")
    print("| --- | --- | --- | --- | --- |")
    for photo, pixels in pictures:
        for how in PUBLISHING[1:]:
            kind, _, value = how.partition(" ")
            x = uad.to_tensor(pixels)
            ours = (
                uad.jpeg(x, int(value))
                if kind == "jpeg"
                else uad.resize_round_trip(x, float(value))
            )
            diff = np.abs(uad.to_pixels(ours).astype(int) - publish(pixels, how).astype(int))
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
    p.add_argument("--robust", default="jpeg:50-95,resize:0.5-1")
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
    print(
        "| photo | published as | --robust | d(published, clean) | d(published, target) "
        "| PSNR dB | SSIM |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    features = lambda x: uad.encoder_features(sam, x, first.layers, first.dtype)  # noqa: E731
    seconds = {name: [] for name in configs}
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
            for how in PUBLISHING:
                out = uad.to_tensor(publish(protected, how), device)
                with torch.no_grad():
                    f_out = features(out)
                    d_clean = uad.feature_distance(f_out, f_clean).clamp_min(0).item()
                    d_target = uad.feature_distance(f_out, f_target).clamp_min(0).item()
                ssim = warp_kernel.ssim(out, clean).item()
                print(
                    f"| {photo} | {how} | {name} | {d_clean:.4f} | {d_target:.4f} "
                    f"| {unsegment.images.psnr(out, clean):.2f} | {ssim:.4f} |",
                    flush=True,
                )
    print(
        "attack seconds per photo: "
        + ", ".join(f"--robust {k}: {np.mean(v):.1f}" for k, v in seconds.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
