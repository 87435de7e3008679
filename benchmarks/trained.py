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
seconds per image of each attack, and writes RUN_DIR/trained.json.

These are small models trained on synthetic composites, not SAM: the table shows how the attacks
rank on models that have learnt to segment, not what they do to SAM.
"""

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import unsegment.models

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds scripts
import composites  # noqa: E402
import reproduce  # noqa: E402
import train_sam  # noqa: E402

ATTACKS = ("paper", "no-fidelity", "authors", "aa", "noise")
HELDOUT_SEED = 1  # the held-out composites' seed; training draws from the models' own seeds


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


def cells(table: dict) -> dict:
    """{(attack, prompts): (mIoU, ASR@50)} of reproduce.py's table.json (one model)."""
    return {(c["attack"], c["prompts"]): (c["miou"], c["asr50"]) for c in table["table"]}


def format_table(tables: dict) -> str:
    """The markdown table: attack x (model a, model b), and the cost of each attack."""
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
    table = format_table(tables)
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
        "training": trained,
        "checkpoints": {m: str(p) for m, p in paths.items()},
    }
    (args.out / "trained.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
