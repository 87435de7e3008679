"""What one protected image costs: encoder passes per preset and seconds per image.

    python benchmarks/attack_cost.py [--model-type vit_b] [--size 1024] [--threads 2] [--full]
        [--attention sam,sdpa] [--dtype float32,bfloat16] [--device cpu] [--batch N] [--join]
        [--compile] [--authors-checkout PATH]

Takes the encoder passes of each preset at the default step counts from uad.encoder_passes
(a test checks them against the passes an attack counts). Then times, on a random-init SAM of --model-type (the cost does not depend on the weights), one
feature forward (blocks 0..6), one feature forward+backward, the non-encoder work of one
deformation step (warp + SSIM + flow regulariser + Adam), and the whole encoder's forward and
forward+backward. Seconds per image = passes x timed seconds per pass, plus the deformation
steps' own work; the reference code's cost is its 237 forwards and 196 backwards of the whole
encoder priced the same way. --full also times complete attacks of each preset (for every
--attention x --dtype combination).

--attention and --dtype take comma-separated lists: the feature passes of every combination
are timed in turn (one pass of each per round, --repeats rounds, medians), so that a drifting
machine reaches them all alike, and each combination is priced, with its speed-up over SAM's
attention in float32 and the issue's goals as ratios. --batch N also times passes of N images
and prices folder mode (uad.py --batch N) in images per minute. --join also times a
deformation step's target and proxy passes as one batch, against two calls (uad's
join_passes). --compile prices a --compile-steps-step stage 2 whose encoder runs through
torch.compile, compile time included, against the same steps eager. --authors-checkout PATH
times the authors' code (github.com/jiahaolu97/anything-unsegmentable, a checkout of yours;
nothing of it is part of this project) and prices it per image from its deformation and PGD
steps, instead of from encoder passes alone.

    python benchmarks/attack_cost.py --surrogates vit_b,sam2.1_t,mobile_sam [--threads 2]

prices each surrogate instead (random-init, from its package's builder; see `surrogate_costs`).
"""

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import uad
import unsegment.cost
import unsegment.models
import warp_kernel

REFERENCE_PASSES = (237, 196)  # full-encoder forwards, backwards per image in the authors' code
AUTHORS_SCRIPT = Path(__file__).resolve().parent / "authors_step.py"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each of fns, after a warm-up of each, timed in turn: one run of every
    fn per round, `repeats` rounds."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(timed(fn, device))
    return {key: float(np.median(t)) for key, t in times.items()}


def csv(choices):
    def parse(text):
        values = text.split(",")
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r}: choose from {', '.join(choices)}")
        return values

    return parse


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
        surrogate = uad.Surrogate.of(
            unsegment.models.build_model(name).eval().requires_grad_(False), name
        )

        def features(backward: bool):
            x = image.clone().requires_grad_(backward)
            f = surrogate.features(x, config)
            if backward:
                sum(v.sum() for v in f).backward()

        def forward():
            with torch.no_grad():
                features(False)

        t = alternate({"f": forward, "fb": lambda: features(True)}, repeats, image.device)
        t_f, t_fb = t["f"], t["fb"]
        per_image = [fwd * t_f + bwd * (t_fb - t_f) for fwd, bwd in passes.values()]
        print(
            f"| {name} | {surrogate.family} | {max(surrogate.blocks(config)) + 1} of "
            f"{surrogate.depth}, no neck | {unsegment.cost.forward_gflops(surrogate, config):.0f} "
            f"| {t_f:.2f} | {t_fb:.2f} | {per_image[0]:.0f} | {per_image[1]:.0f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-type", default="vit_b", choices=list(unsegment.models.SAM_ARCHS))
    p.add_argument("--size", type=int, default=1024, help="side of the (square) test photo")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=2, help="timed runs per pass (median)")
    p.add_argument("--full", action="store_true", help="also time complete attacks")
    p.add_argument(
        "--surrogates", metavar="NAME,..", help="price these surrogates (uad.py --surrogate names)"
    )
    p.add_argument("--attention", type=csv(uad.ATTENTIONS), default=["sam"], help="[sam]")
    p.add_argument("--dtype", type=csv(("float32", "bfloat16")), default=["float32"])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch", type=int, default=1, help="also price folder mode --batch N [1]")
    p.add_argument("--join", action="store_true", help="also time joined target+proxy passes")
    p.add_argument("--compile", action="store_true", help="also price a compiled stage 2")
    p.add_argument("--compile-steps", type=int, default=40, help="its steps [40]")
    p.add_argument("--authors-checkout", type=Path, metavar="PATH", help="time the authors' code")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("attack_cost.py: --device cuda, but no CUDA GPU is visible")
    from PIL import Image

    passes = {preset: uad.encoder_passes(uad.preset_config(preset)) for preset in uad.PRESETS}
    torch.manual_seed(0)
    sam = unsegment.models.build_sam(args.model_type).requires_grad_(False).to(device)
    photo = Image.open(Path(__file__).resolve().parent.parent / "examples" / "astronaut.png")
    image = uad.to_tensor(np.asarray(photo.convert("RGB").resize((args.size, args.size))), device)
    if args.surrogates:
        print(f"{args.size}x{args.size} photo, {args.threads} threads, torch {torch.__version__}")
        return surrogate_costs(args.surrogates.split(","), image, args.repeats)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"{args.model_type} random-init, {args.size}x{args.size} photo, {args.threads} threads, "
        f"{device}{gpu}, torch {torch.__version__}, warp_kernel backends {warp_kernel.backends()}",
        flush=True,
    )
    layers = uad.UADConfig().layers
    variants = list(itertools.product(args.attention, args.dtype))
    sizes = sorted({1, args.batch} | ({2, 2 * args.batch} if args.join else set()))

    def features(variant, backward: bool, batch: int):
        x = image.expand(batch, -1, -1, -1).clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            f = uad.encoder_features(sam, x, layers, variant[1], variant[0])
            if backward:
                sum(v.sum() for v in f).backward()

    def whole_encoder(backward: bool):
        x = uad.sam_input(image, sam).requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            out = sam.image_encoder(x)
            if backward:
                out.sum().backward()

    fns = {}
    for variant, batch, backward in itertools.product(variants, sizes, (False, True)):
        fns[variant, batch, backward] = lambda v=variant, b=batch, bw=backward: features(v, bw, b)
    fns["reference", 1, False] = lambda: whole_encoder(False)
    fns["reference", 1, True] = lambda: whole_encoder(True)
    t = alternate(fns, args.repeats, device)

    steps = 5
    config = uad.preset_config("no-fidelity", deform_steps=steps)  # no encoder in its stage 1
    gen = torch.Generator().manual_seed(0)
    t_deform = {}
    for batch in sizes:
        x = image.expand(batch, -1, -1, -1).contiguous()
        run = lambda: uad.deform(x, None, None, config, gen, None)  # noqa: E731
        t_deform[batch] = alternate({0: run}, args.repeats, device)[0] / steps
    t_ef, t_efb = t["reference", 1, False], t["reference", 1, True]
    print(
        f"whole encoder (SAM's attention, float32): forward {t_ef:.2f} s, forward+backward "
        f"{t_efb:.2f} s; one deformation step without the encoder {1000 * t_deform[1]:.0f} ms",
        flush=True,
    )
    base = ("sam", "float32") if ("sam", "float32") in variants else variants[0]
    print(f"features (blocks 0..{max(layers)}), seconds per pass at batch {sizes}:")
    print(
        f"| attention | dtype | batch | forward s | forward+backward s | per image vs {base[0]} {base[1]} |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, batch in itertools.product(variants, sizes):
        fwd, both = t[variant, batch, False], t[variant, batch, True]
        gain = t[base, 1, True] * batch / both
        print(f"| {variant[0]} | {variant[1]} | {batch} | {fwd:.3f} | {both:.3f} | {gain:.2f}x |")

    def price(variant, preset, batch=1, join=False):
        """Seconds per image of `preset` at `batch` images per attack."""
        full = uad.preset_config(preset)
        fwd, bwd = passes[preset]
        f, fb = t[variant, batch, False], t[variant, batch, True]
        deforms = full.method == "uad"
        secs = fwd * f + bwd * (fb - f) + deforms * full.deform_steps * t_deform[batch]
        if join and deforms and uad.uses_fidelity(full):  # a step's two passes as one batch
            secs -= full.deform_steps * (2 * fb - t[variant, 2 * batch, True])
        return secs / batch

    depth = len(sam.image_encoder.blocks)
    fwd, bwd = REFERENCE_PASSES
    reference = fwd * t_ef + bwd * (t_efb - t_ef)
    print(
        f"\n| attack | encoder forwards | encoder backwards | blocks run | s per image ({device}) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for variant in variants:
        label = "" if variants == [("sam", "float32")] else f", {variant[0]} {variant[1]}"
        for preset, (fwd, bwd) in passes.items():
            print(
                f"| unsegment `{preset}`{label} | {fwd} | {bwd} | {max(layers) + 1} of {depth}, "
                f"no neck | {price(variant, preset):.0f} |",
                flush=True,
            )
            if args.join and price(variant, preset, join=True) != price(variant, preset):
                print(
                    f"| unsegment `{preset}`{label}, joined passes | {fwd} | {bwd} | | "
                    f"{price(variant, preset, join=True):.0f} |"
                )
            if args.full:
                full = uad.preset_config(preset, attention=variant[0], dtype=variant[1])
                start = time.perf_counter()
                uad.attack(image, sam, full)
                sync(device)
                seconds = time.perf_counter() - start
                print(f"| unsegment `{preset}`{label}, complete run | | | | {seconds:.0f} |")
    print(
        f"| reference code, encoder passes only | {REFERENCE_PASSES[0]} | {REFERENCE_PASSES[1]} | "
        f"{depth} of {depth} + neck | {reference:.0f} |"
    )
    authors = authors_cost(args, device) if args.authors_checkout else None
    if authors is not None:
        print(
            f"| reference code, its steps timed | | | {depth} of {depth} + neck | {authors:.0f} |"
        )

    print("\ngoals (ratios measured side by side in this run):")
    for variant in variants:
        gain = t[base, 1, True] / t[variant, 1, True]
        cheap, paper = price(variant, "no-fidelity"), price(variant, "paper", join=args.join)
        print(
            f"  {variant[0]} {variant[1]}: features forward+backward {gain:.2f}x faster than "
            f"{base[0]} {base[1]} (goal >= 2x); `no-fidelity` 1/{reference / cheap:.1f} of the "
            f"reference code's encoder time (goal 1/16), `paper` {paper / reference:.2f} of it "
            f"(goal <= 0.33)"
            + (f"; against its timed steps 1/{authors / cheap:.1f} and {paper / authors:.2f}"
               if authors else "")  # fmt: skip
        )
    if args.batch > 1:
        print(f"\nfolder mode, --batch {args.batch} against --batch 1 (images per minute):")
        for variant, preset in itertools.product(variants, ("paper", "no-fidelity")):
            join = args.join or device.type == "cuda"  # what join_passes "auto" does
            one, many = price(variant, preset, 1, join), price(variant, preset, args.batch, join)
            print(
                f"  {variant[0]} {variant[1]} `{preset}`: {60 / one:.2f} -> {60 / many:.2f} "
                f"images/min ({one:.1f} -> {many:.1f} s per image)"
            )
    if args.compile:
        compile_cost(sam, image, variants, args.compile_steps, args.repeats, device)


def compile_cost(sam, image, variants, steps: int, repeats: int, device) -> None:
    """Prices `steps` PGD steps of stage 2 (encoder forward + backward + step) with the encoder
    features through torch.compile, compile time included, against the same steps eager."""
    print(f"\nstage 2 of {steps} steps, eager against torch.compile (compile time included):")
    for attention, dtype in variants:
        config = uad.UADConfig(attention=attention, dtype=dtype)
        with torch.no_grad():
            f_image = uad.encoder_features(sam, image, config.layers, dtype, attention)
        f_target = [f.roll(1, 1) for f in f_image]  # any fixed target costs the same

        def step(features):
            x = image.clone().requires_grad_(True)
            f_x = features(sam, x, config.layers, dtype, attention)
            (grad,) = torch.autograd.grad(uad.simulation_loss(f_x, f_target, f_image).sum(), x)
            return uad.pgd_step(x.detach(), grad, image, config, None)

        torch._dynamo.reset()
        compiled = torch.compile(uad.encoder_features)
        first = timed(lambda: step(compiled), device)  # compiles forward and backward
        t = alternate(
            {"eager": lambda: step(uad.encoder_features), "compiled": lambda: step(compiled)},
            repeats,
            device,
        )
        eager, total = steps * t["eager"], first + (steps - 1) * t["compiled"]
        verdict = "pays" if total < eager else "does not pay"
        print(
            f"  {attention} {dtype}: eager {t['eager']:.2f} s per step, {eager:.0f} s in all; "
            f"compiled {t['compiled']:.2f} s per step after a first step of {first:.0f} s, "
            f"{total:.0f} s in all: compiling {verdict} ({eager / total:.2f}x)",
            flush=True,
        )


def authors_cost(args, device) -> float:
    """Times the authors' code from a checkout (in a subprocess, its own segment_anything first
    on the path) and prices one image at its defaults; prints what it timed."""
    cmd = [sys.executable, str(AUTHORS_SCRIPT), str(args.authors_checkout.resolve())]
    cmd += ["--threads", str(args.threads), "--device", str(device), "--repeats", str(args.repeats)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        why = (result.stdout.strip() or result.stderr.strip() or "no output").splitlines()[-1]
        print(f"authors' code: not timed: {why}")
        return None
    print(result.stdout.strip())
    return float(result.stdout.strip().splitlines()[-1].split()[-2])


if __name__ == "__main__":
    main()
