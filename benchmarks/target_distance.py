"""How far each attack's target lies from the image in the surrogate's features, how far the
protected image moves, and what that does to the masks (docs/trained.md): on the held-out
composites of benchmarks/trained.py, with one trained model as surrogate and scored model.

    python benchmarks/target_distance.py --checkpoint A.pth --heldout RUN_DIR/heldout --images 12

Rows: `no-fidelity` as the preset has it, without its flow regulariser (lambda_c 0), and also
with four times its deformation learning rate (lr x4), then `authors` and `aa` (target: the next
image of the set). Columns: d(f(I), f(T)) between the image and the target (1 - cosine, stage
2's d; two different images of the set, in the footer), d(f(adv), f(I)) after stage 2, and mIoU
over eval.py's prompts (reproduce.py's defaults), beside the clean images'.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import eval as ev
import uad
import unsegment.models
from unsegment import authors

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds scripts
import reproduce  # noqa: E402
import trained  # noqa: E402

EPS = 8 / 255


def variants(overrides: dict):
    """(name, attack(x, sam) -> uad.AttackResult with the target it pulled towards)."""

    def preset(name, **fields):
        return lambda x, sam: uad.attack(x, sam, uad.preset_config(name, **overrides, **fields))

    def aa(x, sam):
        target = torch.roll(x, 1, 0)  # the next image of the set
        config = uad.preset_config("aa", **overrides)
        return uad.attack(x, sam, config, target_image=target)._replace(target=target)

    faster = 4 * uad.UADConfig.deform_lr
    return [
        ("no-fidelity", preset("no-fidelity")),
        ("no-fidelity, lambda_c 0", preset("no-fidelity", lambda_c=0.0)),
        ("no-fidelity, lambda_c 0, lr x4", preset("no-fidelity", lambda_c=0, deform_lr=faster)),
        ("authors", lambda x, sam: authors.attack(x, sam, authors.authors_config(**overrides))),
        ("aa", aa),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="target_distance.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a sam_vit checkpoint")
    p.add_argument("--heldout", type=Path, required=True, help="composites (trained.py's)")
    p.add_argument("--images", type=int, default=12, help="(%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="attacks and prompts (%(default)s)")
    p.add_argument("--steps", type=int, help="PGD steps (the presets': 40)")
    p.add_argument("--deform-steps", type=int, help="deformation steps (40)")
    p.add_argument("--threads", type=int, default=2, help="(%(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"seed": args.seed}
    for field in ("steps", "deform_steps"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    sam = unsegment.models.load_model("sam_vit", args.checkpoint)
    items = trained.heldout_prompts(args.heldout, args.images, args)
    files = reproduce.sa1b_images(args.heldout, args.images)
    images = [np.array(Image.open(item.image).convert("RGB")) for item in files]
    predictor = ev.segmenter_of("sam_vit", sam, torch.device("cpu")).new_predictor()

    def miou(pixels) -> float:
        ious = []
        for rgb, (objects, prompts) in zip(pixels, items):
            ious += reproduce.score_image(predictor, rgb, prompts, objects)
        return float(np.mean(ious))

    x = torch.stack([uad.to_tensor(image)[0] for image in images])
    surrogate = uad.Ensemble(uad.surrogates_of(sam), uad.preset_config("paper"), uad.Stats())

    def d(a, b) -> float:
        with torch.no_grad():
            return uad.feature_distance(surrogate(a), surrogate(b)).mean().item()

    print(
        f"{len(images)} composites of {args.heldout}, surrogate and scored model "
        f"{args.checkpoint.name}, eps 8/255, seed {args.seed}"
    )
    print("| attack | d(I, target) | d(adv, I) | mIoU |\n| --- | --- | --- | --- |")
    print(f"| clean | - | - | {miou(images):.2f} |")
    for name, attack in variants(overrides):
        result = attack(x, sam)
        adv = uad.quantize(result.adv, x, EPS)
        pixels = [uad.to_pixels(a[None]) for a in adv]
        row = f"| {name} | {d(x, result.target):.3f} | {d(adv, x):.3f} | {miou(pixels):.2f} |"
        print(row, flush=True)
    print(f"two different images of the set: d = {d(x, torch.roll(x, 1, 0)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
