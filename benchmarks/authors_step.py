"""Times the authors' UAD code from a checkout of theirs, and prices one image at its defaults.

    python benchmarks/authors_step.py CHECKOUT [--threads 2] [--device cpu] [--photo PATH]

CHECKOUT is a clone of github.com/jiahaolu97/anything-unsegmentable (nothing of it is part of
this project; benchmarks/attack_cost.py --authors-checkout runs this script). Its own
segment_anything (the fork whose image encoder keeps every block's output) and its `attack`
modules are imported from there; the attack needs what they import: cv2, tqdm,
pytorch_msssim (its evaluation modules, which need pycocotools and FastSAM, are not loaded).
On a random-init ViT-B (the cost does not depend on the weights) it runs SamAttacker.UAD
unchanged three times with few steps,

    A: 1 deformation epoch, 1 final PGD step        S + D + P
    B: 1 deformation epoch, 2 final PGD steps       S + D + 2 P
    C: 2 deformation epochs, 1 fidelity + 1 final   S + 2 D + 2 P

(after one untimed run of A; --repeats rounds of the three, medians), and solves for P (one PGD / fidelity iteration: a forward and
backward of the whole encoder), D (a deformation epoch's own work: its spline warps, losses
and backward, and its forward of the warped image) and S (set-up: reading and encoding the
image). One image at the code's defaults (40 epochs, 4 fidelity iterations each, 40 PGD steps
in the last) costs S + 40 D + 196 P; the last line prints it.
"""

import argparse
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--photo", type=Path, default=ROOT / "examples" / "astronaut.png")
    p.add_argument("--repeats", type=int, default=1, help="rounds of A, B, C (medians) [1]")
    args = p.parse_args(argv)
    checkout = args.checkout.resolve()
    if not (checkout / "attack" / "attacker.py").is_file():
        print(f"{checkout}: not a checkout of the authors' code (no attack/attacker.py)")
        return 2
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(checkout))  # their segment_anything, config and attack come first
    # their attack package's __init__ also loads its evaluation (pycocotools, FastSAM): load
    # attack.attacker alone, as a module of an empty `attack` package
    package = types.ModuleType("attack")
    package.__path__ = [str(checkout / "attack")]
    sys.modules["attack"] = package
    os.chdir(checkout)
    try:
        from attack.attacker import SamAttacker
        from segment_anything import sam_model_registry
    except ImportError as e:
        print(f"the authors' code needs {e.name or e}: install it to time that code")
        return 2
    import segment_anything

    if not str(Path(segment_anything.__file__).resolve()).startswith(str(checkout)):
        print(f"segment_anything came from {segment_anything.__file__}, not from {checkout}")
        return 2
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None).to(args.device)
    attacker = SamAttacker(sam)

    def run(epochs: int, final_steps: int) -> float:
        np.random.seed(0)
        attacker.adv_iters = final_steps
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        attacker.UAD(str(args.photo.resolve()), deform_epochs=epochs, est_fidelity_iter=1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(1, 1)  # warm-up
    rounds = [(run(1, 1), run(1, 2), run(2, 1)) for _ in range(args.repeats)]
    a, b, c = np.median(np.array(rounds), axis=0)
    pgd = b - a
    deform = c - a - pgd
    setup = a - deform - pgd
    total = setup + 40 * deform + 196 * pgd
    print(
        f"authors' code ({checkout.name}, {args.device}, {args.threads} threads): runs A {a:.1f} "
        f"s, B {b:.1f} s, C {c:.1f} s; PGD step {pgd:.2f} s, deformation epoch's own work "
        f"{deform:.2f} s, set-up {setup:.2f} s"
    )
    print(f"authors' code per image at its defaults (S + 40 D + 196 P): {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
