"""The attack table on small promptable segmenters trained here (docs/trained.md): models a and b
of benchmarks/train_sam.py, trained if they are not cached; a held-out set of composites of the
examples/ photos (benchmarks/composites.py); every attack with model a as the surrogate; both
models scored with eval.py's protocol (a: white-box, b: transfer).

    python benchmarks/trained.py --out RUN_DIR [--images 24] [--train-steps 1500]

The models are cached in $UNSEGMENT_CACHE/trained/ (default ~/.cache/unsegment/trained/) under
a name that holds the digest of their training settings; the two train at once, one thread
each. The protection and scoring are benchmarks/reproduce.py's, run once per scored model on
the same RUN_DIR/run (so the protected images are made once and reused). Prints mIoU (points,
boxes, all) and ASR@50 (all prompts) per attack and model beside clean, the encoder passes and
seconds per image of each attack, and writes RUN_DIR/trained.json. Below clean, two reference
rows say what "has learnt to segment" means: each model on uniform grey images (the prompts
alone), and the box prompt itself taken as the mask (what ignoring the image scores).

These are small models trained on synthetic composites, not SAM: the table shows how the attacks
rank on models that have learnt to segment, not what they do to SAM.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import eval as ev
import unsegment.models

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds scripts
import composites  # noqa: E402
import reproduce  # noqa: E402
import train_sam  # noqa: E402

ATTACKS = ("paper", "no-fidelity", "authors", "aa", "noise")
HELDOUT_SEED = 1  # the held-out composites' seed; training draws from the models' own seeds
# Two rows of reference beside clean: what a model makes of the prompts on a uniform grey image
# (nothing to segment from), and what the box prompt itself scores as the mask (a model that
# ignores the image). A model that segments is far above the first and above the second.
GREY, BOX = "uniform grey", "the box itself"


def train_config(model: str, steps: int) -> train_sam.TrainConfig:
    return train_sam.TrainConfig(train_sam.MODELS[model], train_sam.SEEDS[model], steps=steps)


def checkpoint_path(model: str, steps: int) -> Path:
    """Where model `model` trained for `steps` is cached: the digest of its settings names it."""
    key = json.dumps(train_config(model, steps).key(), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return unsegment.models.cache_dir() / "trained" / f"sam_small_{model}_{digest}.pth"


def train_missing(steps: int, quiet: bool) -> dict:
    """{model: checkpoint} for a and b, training the missing ones at once, one process each."""
    paths = {m: checkpoint_path(m, steps) for m in ("a", "b")}
    jobs = []
    for model, path in paths.items():
        if not path.is_file():
            command = [sys.executable, str(Path(train_sam.__file__)), model, str(path)]
            command += ["--steps", str(steps)] + (["--quiet"] if quiet else [])
            print(f"training model {model} into {path}", file=sys.stderr, flush=True)
            jobs.append(subprocess.Popen(command))
    if any(job.wait() != 0 for job in jobs):
        raise SystemExit("error: training failed")
    return paths


def score(run_dir: Path, heldout: Path, args, surrogate: Path, model: Path) -> dict:
    """reproduce.py's table.json for one scored model (protecting first if not done yet)."""
    argv = ["--sa1b", str(heldout), "--images", str(args.images), "--out", str(run_dir)]
    argv += ["--attacks", ",".join(ATTACKS), "--models", f"sam_vit={model}"]
    argv += ["--surrogate", "sam_vit", "--surrogate-checkpoint", str(surrogate)]
    argv += ["--eps", str(args.eps), "--seed", str(args.seed), "--device", args.device]
    argv += ["--quiet"] if args.quiet else []
    with open(run_dir.parent / "reproduce.log", "a") as log, contextlib.redirect_stdout(log):
        code = reproduce.main(argv)
    if code != 0:
        raise SystemExit(f"error: reproduce.py failed (see {run_dir.parent / 'reproduce.log'})")
    return json.loads((run_dir / "table.json").read_text())


def heldout_prompts(heldout: Path, count: int, args) -> list:
    """[(objects, prompts)] of the first `count` held-out composites, drawn as reproduce.py draws
    them (its --max-masks, --points and --boxes defaults, --seed and the image's name)."""
    defaults = reproduce.build_parser().parse_args(["--sa1b", str(heldout)])
    items = []
    for item in reproduce.sa1b_images(heldout, count):
        with Image.open(item.image) as im:
            size = (im.height, im.width)
        objects = ev.read_annotations(item.annotations, size, defaults.max_masks)
        prompts = ev.sample_prompts(objects, item.name, args.seed, defaults.points, defaults.boxes)
        items.append((objects, prompts))
    return items


def box_itself(items) -> dict:
    """{"box": eval.Metrics} of the masks that are the box prompts themselves (every pixel whose
    centre lies in the box, its corners' pixels included)."""
    ious = []
    for objects, prompts in items:
        for p in (p for p in prompts if p.kind == "box"):
            x0, y0, x1, y1 = p.coords
            mask = np.zeros_like(objects[p.object].mask)
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
            ious.append(ev.mask_iou(mask, objects[p.object].mask))
    return {"box": ev.summarise_ious(ious)}


def uniform_grey(items, checkpoint: Path, device: str) -> dict:
    """{kind: eval.Metrics} of the model at `checkpoint` given the prompts on uniform grey images
    (128 in every channel) of the composites' size."""
    model = unsegment.models.load_model("sam_vit", checkpoint, torch.device(device))
    predictor = ev.segmenter_of("sam_vit", model, torch.device(device)).new_predictor()
    ious, kinds = [], []
    for objects, prompts in items:
        if objects:
            grey = np.full((*objects[0].mask.shape, 3), 128, np.uint8)
            ious += reproduce.score_image(predictor, grey, prompts, objects)
            kinds += [p.kind for p in prompts]
    by_kind = {k: [i for i, kind in zip(ious, kinds) if kind == k] for k in ev.PROMPT_KINDS}
    return {k: ev.summarise_ious(v) for k, v in {**by_kind, "all": ious}.items()}


def cells(table: dict) -> dict:
    """{(attack, prompts): (mIoU, ASR@50)} of reproduce.py's table.json (one model)."""
    return {(c["attack"], c["prompts"]): (c["miou"], c["asr50"]) for c in table["table"]}


def as_dicts(metrics: dict) -> dict:
    return {kind: dataclasses.asdict(m) for kind, m in metrics.items()}


def reference_rows(references: dict) -> list:
    """The table's rows of GREY and BOX (see there); "-" where a cell does not apply."""

    def cell(metrics: dict, kind: str, field: str) -> str:
        value = getattr(metrics[kind], field) if kind in metrics else None
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for name in (GREY, BOX):
        row = [name]
        for model in ("a", "b"):
            metrics = references[name][model] if name == GREY else references[name]
            row.append(" / ".join(cell(metrics, k, "miou") for k in reproduce.KINDS))
            row.append(cell(metrics, "all", "asr50"))
        rows.append(row + ["-", "-"])
    return rows


def format_table(tables: dict, references: dict) -> str:
    """The markdown table: attack x (model a, model b), and the cost of each attack; below clean,
    the two reference rows (reference_rows)."""
    head = ["attack"]
    for model, role in (("a", "white-box"), ("b", "transfer")):
        head += [f"{model} ({role}) mIoU point / box / all", f"{model} ASR@50"]
    head += ["encoder passes (fwd, bwd)", "s / image*"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    first = tables["a"]
    for attack in (reproduce.CLEAN, *ATTACKS):
        row = [attack]
        for model in ("a", "b"):
            c = cells(tables[model])
            row.append(" / ".join(f"{c[(attack, k)][0]:.2f}" for k in reproduce.KINDS))
            row.append(f"{c[(attack, 'all')][1]:.2f}")
        if attack == reproduce.CLEAN:
            row += ["-", "-"]
        else:
            passes = first["encoder_passes"][attack]
            row += [
                f"{passes[0]}, {passes[1]}",
                f"{first['seconds_per_image']['protect'][attack]:.1f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
        if attack == reproduce.CLEAN:
            lines += ["| " + " | ".join(r) + " |" for r in reference_rows(references)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="trained.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    p.add_argument("--images", type=int, default=24, help="held-out composites (%(default)s)")
    p.add_argument(
        "--train-steps", type=int, default=train_sam.TrainConfig.steps, help="(%(default)s)"
    )
    p.add_argument("--eps", type=float, default=8.0, help="in 1/255 (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="attacks and prompts (%(default)s)")
    p.add_argument("--device", default="cpu", help="(%(default)s)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    paths = train_missing(args.train_steps, args.quiet)
    heldout = args.out / "heldout"
    composites.write_split(heldout, "heldout", args.images, HELDOUT_SEED)
    tables = {m: score(args.out / "run", heldout, args, paths["a"], paths[m]) for m in paths}
    trained = {m: json.loads(paths[m].with_suffix(".json").read_text()) for m in paths}
    items = heldout_prompts(heldout, args.images, args)
    references = {
        GREY: {m: uniform_grey(items, paths[m], args.device) for m in paths},
        BOX: box_itself(items),
    }
    table = format_table(tables, references)
    n = tables["a"]["table"][0]["count"]
    print(
        f"{len(tables['a']['images'])} held-out composites, {n} point prompts per attack and "
        f"model, eps {args.eps:g}/255, surrogate a\n{table}\n"
        "* seconds per image, on this machine as it was (void where other work shares it)\n"
        + "training: "
        + ", ".join(
            f"{m} {t['config']['steps']} steps, {t['seconds'] / 60:.1f} min*"
            for m, t in trained.items()
        )
    )
    out = {
        "tables": tables,
        "references": {
            GREY: {m: as_dicts(r) for m, r in references[GREY].items()},
            BOX: as_dicts(references[BOX]),
        },
        "training": trained,
        "checkpoints": {m: str(p) for m, p in paths.items()},
    }
    (args.out / "trained.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
