"""The paper's table in one command: protect SA-1B images with each attack, score them with
eval.py's protocol on each model, and print attack x model beside the paper's numbers (from the
authors' logs).

    python benchmarks/reproduce.py --sa1b DIR --images 1000 \\
        --attacks paper,reference,authors,aa,noise \\
        --models vit_b=sam_vit_b_01ec64.pth,vit_l=sam_vit_l_0b3195.pth,vit_h=sam_vit_h_4b8939.pth \\
        --out RUN_DIR

DIR holds SA-1B's sa_N.jpg + sa_N.json pairs; the first N images by number are the set (the
paper's are sa_1 to sa_1000 of sa_000000.tar), or all of them if it holds fewer. Stages, each resumable:

1. protect: every image with every attack into RUN_DIR/ATTACK/sa_N.png, exactly within eps
   (checked on the file as saved), with one surrogate loaded once if an attack needs it (the
   noise baseline does not). Attacks: uad.py's presets
   (paper, no-fidelity or its old name reference, the baselines aa and noise) and `authors`
   (unsegment/authors.py). The aa baseline's target is another image of the set, drawn from
   the seed and the image's name (so a different --images draws other targets).
2. score: every model, loaded once, scores the clean image and each protected one in eval.py's
   annotation mode: the first --max-masks (10) annotations, --points (5) points and --boxes (3)
   jittered boxes each, drawn from the seed and the image's name, so the same prompts for every
   attack and model (and for eval.py run on the same folders with the same seed).
3. table: mIoU and ASR@50 for points, boxes and all, attack x model (the clean images too),
   with the paper's numbers in brackets; image quality and seconds per image per attack and per
   model; RUN_DIR/table.json and table.csv with the settings, package versions, device, seed.

Resuming: each protected image and each (model, image, attack) score is recorded in its own
file under RUN_DIR/records/, written whole or not at all (unsegment.images.write_atomically),
with the settings it was made with; a rerun skips what is recorded with the same settings and
redoes the rest (a protected image deleted or changed, or a new attack, model or image). A bad
image (it does not decode, its annotation file is missing or corrupt) is one line and is left
out.

For reproduction only (docs/reproduce.md, "Like with like"; the table's footer says which apply):
--release authors releases as the authors' code does (PGD on SAM's padded, normalised input,
truncated to uint8 there and resized back), NOT within eps, the table's L-inf column saying how
far; --log-prompts DIR scores the prompts of the authors' logs (their exp/log/benchmark);
--fastsam-rgb gives FastSAM RGB as their code did; --aa-distance l2 is their AA's distance.

--cost runs the same pipeline on one synthetic SA-1B-sized image with random-init weights (the
arithmetic does not depend on them) and prints the seconds per image of each stage.
"""

import argparse
import csv
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
import eval as ev
import uad
import unsegment.cli
import unsegment.images
import unsegment.models
import unsegment.progress
from unsegment import authors, authors_logs, distributed

ATTACKS = (*uad.PRESETS, *uad.PRESET_ALIASES, "authors")
CLEAN = "clean"  # the clean images, scored like an attack
# The attack flags, as uad.py names them and in its units (--eps and --alpha in 1/255)
ATTACK_FLAGS = ("eps", "alpha", "steps", "deform_steps", "proxy_steps", "layers", "dtype")
# The paper's numbers as computed from the raw result logs the authors' code ships (1000 SA-1B
# images, 49,795 point and 29,877 box prompts), as (mIoU, ASR@50) in percent; None where the logs
# give no figure.
PAPER = {
    "uad": {
        "vit_b": {"all": (51.53, 43.88), "point": (37.64, None), "box": (74.68, None)},
        "vit_l": {"all": (66.07, 26.43)},
        "vit_h": {"all": (68.96, 23.42)},
        "fastsam": {"all": (28.83, 69.94)},
    },
    "aa": {
        "vit_b": {"all": (61.06, 32.48)},
        "vit_l": {"all": (70.70, 21.49)},
        "vit_h": {"all": (72.87, 19.12)},
        "fastsam": {"all": (32.64, 65.86)},
    },
}
PAPER_ROW = {"paper": "uad", "no-fidelity": "uad", "authors": "uad", "aa": "aa"}
PAPER_COLUMN = {"vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h", "fastsam": "fastsam"}
PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "segment-anything",
    "segment-anything-hq",
    "mobilesam-mirror",
    "sam2",
    "ultralytics",
    "timm",
)
KINDS = (*ev.PROMPT_KINDS, "all")


def paper_numbers(attack: str, model: str, kind: str):
    """(mIoU, ASR@50) of the paper's attack in this cell, from the authors' logs, or (None, None)."""
    row = PAPER.get(PAPER_ROW.get(uad.PRESET_ALIASES.get(attack, attack), ""), {})
    return row.get(PAPER_COLUMN.get(model, ""), {}).get(kind, (None, None))


# -----------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Item:
    """One image of the set."""

    image: Path  # DIR/sa_N.jpg
    annotations: Path  # DIR/sa_N.json
    sha256: str = ""  # of the image file
    annotations_sha256: str = ""

    @property
    def name(self) -> str:
        return self.image.stem


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def sa1b_images(folder: Path, count: int, progress=None) -> List[Item]:
    """The first `count` sa_N.jpg files of `folder` by N, each with its sa_N.json; all of them,
    with a warning line on `progress`, if it holds fewer."""
    if not folder.is_dir():
        raise uad.UADError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    numbered = []
    for path in folder.iterdir():
        match = re.fullmatch(r"sa_(\d+)\.jpg", path.name, flags=re.IGNORECASE)
        if match:
            numbered.append((int(match.group(1)), path))
    if not numbered:
        raise uad.UADError(f"{folder}: holds no SA-1B image sa_N.jpg")
    if len(numbered) < count and progress is not None:
        progress.warn(
            f"{folder}: --images {count}, but it holds {len(numbered)} SA-1B image(s) sa_N.jpg: "
            f"taking those {len(numbered)}"
        )
    return [Item(path, path.with_suffix(".json")) for _, path in sorted(numbered)[:count]]


def check_items(items: List[Item], max_pixels: int, log_folders=()):
    """The items whose image decodes and whose annotation file (and log in each of the authors'
    log_folders) exists; one line per other."""
    good, failures = [], []
    for item in items:
        try:
            unsegment.images.read_image(item.image, max_pixels)
            ev.check_annotation_file(item.annotations)
            for folder in log_folders:
                authors_logs.log_file(folder, item.name)
            item.sha256 = file_sha256(item.image)
            item.annotations_sha256 = file_sha256(item.annotations)
            good.append(item)
        except uad.UADError as e:
            failures.append(str(e))
        except OSError as e:
            failures.append(f"{item.image}: cannot be read ({e.strerror or e})")
    return good, failures


def choose_targets(items: List[Item], seed: int) -> Dict[str, Item]:
    """Each image's aa target: one of the other images, uniformly, drawn from (seed, name)."""
    targets = {}
    for i, item in enumerate(items):
        key = int.from_bytes(hashlib.sha256(item.name.encode("utf-8")).digest()[:8], "little")
        j = int(np.random.default_rng([seed, key, 0xAA]).integers(len(items) - 1))
        targets[item.name] = items[j if j < i else j + 1]
    return targets


def parse_attacks(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise uad.UADError("--attacks names no attack")
    seen = {}
    for name in names:
        if name not in ATTACKS:
            raise uad.UADError(
                f"--attacks: unknown attack {name!r}; choose from {', '.join(ATTACKS)}"
            )
        same = uad.PRESET_ALIASES.get(name, name)
        if same in seen:
            raise uad.UADError(f"--attacks: {seen[same]} and {name} are the same attack")
        seen[same] = name
    return names


def attack_config(name: str, args) -> uad.UADConfig:
    """The config of attack `name` with the run's flags, checked as uad.py checks its own."""
    flags = {flag: getattr(args, flag) for flag in ATTACK_FLAGS}
    flags["seed"] = args.seed
    if name == "authors":
        flags.update(authors.OVERRIDES)
    return unsegment.cli.config_from_flags("paper" if name == "authors" else name, flags)


def needs_surrogate(config: uad.UADConfig) -> bool:
    """Whether an attack runs the surrogate: all but the noise baseline, which this script draws
    without one (so without its feature distance)."""
    return config.method != "noise"


def run_attack(name: str, x, sam, config, progress, target=None, args=None) -> uad.AttackResult:
    padded = args is not None and args.release == "authors" and needs_surrogate(config)
    l2 = args is not None and args.aa_distance == "l2" and config.method == "aa"
    if padded or l2:  # for reproduction: the authors' release, their AA's distance
        distance = "l2" if l2 else "cosine"
        stage1 = "authors" if name == "authors" else "uad"
        return authors.reproduction_attack(x, sam, config, target, stage1, distance, padded)
    if name == "authors":
        return authors.attack(x, sam, config, progress)
    if not needs_surrogate(config):
        started = time.monotonic()
        adv = uad.add_noise(x, config)  # what uad.attack draws, without its f(adv) measurement
        return uad.AttackResult(adv, x, uad.Stats(seconds=time.monotonic() - started))
    return uad.attack(x, sam, config, progress, target)


def attack_passes(name: str, config) -> tuple:
    if name == "authors":
        return authors.encoder_passes(config)
    return uad.encoder_passes(config) if needs_surrogate(config) else (0, 0)


def load_model(name: str, checkpoint: Optional[str], device, quiet: bool, fastsam_rgb=False):
    """An eval.py model (ev.Segmenter), loaded once per run."""
    try:
        return ev.load_segmenter(name, checkpoint, device, quiet, fastsam_rgb)
    except (torch.OutOfMemoryError, MemoryError):
        raise uad.UADError(f"out of memory on {device} loading {name}") from None


def score_image(predictor, rgb: np.ndarray, prompts, objects) -> List[float]:
    """IoU in percent of each prompt's mask on one (H, W, 3) uint8 image against its object's
    annotated mask (eval.py's annotation mode for one image)."""
    predictor.set_image(rgb)
    return [ev.mask_iou(ev.predict_mask(predictor, p), objects[p.object].mask) for p in prompts]


# -----------------------------------------------------------------------------------------------
# Records: one file per protected image and per (model, image, attack) score


def canonical(obj):
    """obj as it reads back from JSON (tuples become lists), for comparing keys."""
    return json.loads(json.dumps(obj))


def read_record(path: Path, key) -> Optional[dict]:
    """The record at `path` if it exists, parses and was made with `key`; else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def write_record(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise uad.UADError(f"{path.parent}: cannot create the folder ({e.strerror})") from None
    unsegment.images.write_atomically(
        path, json.dumps(record, indent=1, allow_nan=False).encode("utf-8")
    )


def file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def checkpoint_id(path) -> dict:
    """What a record says of a checkpoint: its path and size (None: the official file)."""
    if path is None:
        return {"path": None}
    return {"path": str(Path(path).resolve()), "bytes": Path(path).stat().st_size}


class Run:
    """A run folder: where every output of the settings `args` lives, and which exist."""

    def __init__(self, args, items: List[Item], targets: Dict[str, Item], device):
        self.args, self.items, self.targets, self.device = args, items, targets, device
        self.out: Path = args.out
        self.attacks: List[str] = args.attacks
        self.configs = {a: attack_config(a, args) for a in self.attacks}
        self.models = ev.parse_models(args.models)
        self.surrogate = {
            "model": args.surrogate,
            "checkpoint": checkpoint_id(args.surrogate_checkpoint),
        }
        self.prompts = dict(seed=args.seed, points=args.points, boxes=args.boxes)
        self.prompts["max_masks"] = args.max_masks
        if args.log_prompts is not None:  # the authors' logs' prompts instead of drawn ones
            self.prompts["log_prompts"] = str(args.log_prompts.resolve())
        if args.fastsam_rgb:
            self.prompts["fastsam_rgb"] = True

    def released(self, attack: str) -> bool:
        """Whether `attack` is released as the authors' code releases (--release authors)."""
        return self.args.release == "authors" and needs_surrogate(self.configs[attack])

    def log_folder(self, variant: str) -> Path:
        """The folder of the authors' logs whose prompts `variant` is scored on: AA's for the aa
        baseline, UAD's for every other attack and the clean images."""
        row = "aa" if variant != CLEAN and self.configs[variant].method == "aa" else "uad"
        return self.args.log_prompts / authors_logs.FOLDERS[row]

    def protected_path(self, attack: str, item: Item) -> Path:
        return self.out / attack / f"{item.name}.png"

    def protect_key(self, attack: str, item: Item):
        target = self.targets[item.name] if self.configs[attack].method == "aa" else None
        return canonical(
            {
                "attack": attack,
                "config": dataclasses.asdict(self.configs[attack]),
                "surrogate": self.surrogate if needs_surrogate(self.configs[attack]) else None,
                "image": item.sha256,
                "target": (
                    None if target is None else {"name": target.name, "sha256": target.sha256}
                ),
                # for reproduction, named only when asked for (earlier records stay valid)
                **({"release": "authors"} if self.released(attack) else {}),
                **(
                    {"distance": "l2"}
                    if target is not None and self.args.aa_distance == "l2"
                    else {}
                ),
            }
        )

    def protect_record(self, attack: str, item: Item) -> Optional[dict]:
        """The record of a protected image still on disk as it was written, else None."""
        path = self.out / "records" / "protect" / attack / f"{item.name}.json"
        record = read_record(path, self.protect_key(attack, item))
        png = self.protected_path(attack, item)
        if record is None or not png.is_file() or file_stamp(png) != record["file"]["stamp"]:
            return None
        return record

    def variants(self) -> List[str]:
        return [CLEAN, *self.attacks]

    def scored_path(self, model: str, variant: str, item: Item) -> Path:
        return self.out / "records" / "score" / model / variant / f"{item.name}.json"

    def score_key(self, model: str, checkpoint, variant: str, item: Item):
        """The key of a score, or None when there is no protected image to score."""
        if variant == CLEAN:
            image = item.sha256
        else:
            protected = self.protect_record(variant, item)
            if protected is None:
                return None
            image = protected["file"]["sha256"]
        return canonical(
            {
                "model": model,
                "checkpoint": checkpoint_id(checkpoint),
                "prompts": self.prompts,
                "variant": variant,
                "image": image,
                "annotations": item.annotations_sha256,
            }
        )

    def score_record(self, model: str, checkpoint, variant: str, item: Item) -> Optional[dict]:
        key = self.score_key(model, checkpoint, variant, item)
        return None if key is None else read_record(self.scored_path(model, variant, item), key)


# -----------------------------------------------------------------------------------------------
# Stage 1: protect


def protect_one(
    run: Run, attack: str, item: Item, sam, progress: unsegment.progress.Progress
) -> str:
    """Protects one image with one attack into its PNG and records it; returns a summary."""
    config, device = run.configs[attack], run.device
    picture = unsegment.images.read_image(item.image, run.args.max_pixels)
    x = uad.to_tensor(picture.pixels, device)
    target = None
    if config.method == "aa":
        other = unsegment.images.read_image(run.targets[item.name].image, run.args.max_pixels)
        target = uad.to_tensor(other.pixels, device).expand(-1, 3, -1, -1)
    released = run.released(attack)
    if released and picture.pixels.dtype != np.uint8:
        raise uad.UADError(f"{item.image}: --release authors takes 8-bit images, as their code")
    if released and picture.pixels.ndim == 2:  # their release is RGB, as their cv2 reading
        picture = dataclasses.replace(picture, pixels=np.repeat(picture.pixels[..., None], 3, 2))
    result = run_attack(attack, x, sam, config, progress, target, run.args)
    if released:  # NOT within eps: truncated at SAM's scale and resized back, as theirs
        pixels = authors.release(result.adv, sam, picture.pixels.shape[:2])
    else:
        pixels = uad.to_pixels(uad.quantize(result.adv, x, config.eps))
    path = run.protected_path(attack, item)
    saved = unsegment.images.write_image(
        path, dataclasses.replace(picture, pixels=pixels), True, True
    )
    # the promise, on the file as saved and re-read; released as theirs, the file holds what
    # their release gives, and its L-inf is reported (a column of the table)
    linf = int(np.abs(saved.pixels.astype(np.int16) - picture.pixels.astype(np.int16)).max())
    budget = math.floor(config.eps * 255 + 1e-6)
    if released and not np.array_equal(saved.pixels, pixels):
        path.unlink()
        raise uad.UADError(f"{path}: the file read back differs from the release; removed")
    if linf > budget and not released:
        path.unlink()
        raise uad.UADError(f"{path}: L-inf {linf}/255 is over the budget {budget}/255; removed")
    rgb = lambda p: np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p  # noqa: E731
    quality = ev.measure_quality(rgb(picture.pixels), rgb(saved.pixels))
    stats = result.stats
    record = {
        "key": run.protect_key(attack, item),
        "file": {"name": path.name, "sha256": file_sha256(path), "stamp": file_stamp(path)},
        "seconds": stats.seconds,
        "forwards": stats.forwards,
        "backwards": stats.backwards,
        "feature_distance": stats.feature_distance[0] if stats.feature_distance else None,
        "target_ssim": stats.target_ssim[0] if stats.target_ssim else None,
        **dataclasses.asdict(quality),
    }
    write_record(run.out / "records" / "protect" / attack / f"{item.name}.json", record)
    psnr = "inf" if quality.psnr is None else f"{quality.psnr:.2f} dB"
    return (
        f"protected {attack}/{path.name}: L-inf {quality.linf}/255, PSNR {psnr}, "
        f"SSIM {quality.ssim:.4f}, {stats.seconds:.1f} s"
    )


def protect_stage(run: Run, failures: List[str]) -> None:
    todo = [(a, i) for a in run.attacks for i in run.items if run.protect_record(a, i) is None]
    total = len(run.attacks) * len(run.items)
    say(
        run,
        f"protect: {len(run.attacks)} attack(s) x {len(run.items)} image(s), "
        f"{total - len(todo)} done earlier, {len(todo)} to do",
    )
    if not todo:
        return
    args, sam = run.args, None
    if any(needs_surrogate(run.configs[attack]) for attack, _ in todo):  # else: never loaded
        sam = unsegment.models.load_model(
            args.surrogate, args.surrogate_checkpoint, run.device, quiet=args.quiet
        )
    progress = unsegment.progress.Progress(
        quiet=args.quiet
    )  # its pace and ETA start after the loading
    for index, (attack, item) in enumerate(todo):
        progress.item(index, len(todo), f"protect {attack} {item.image.name}")
        try:
            summary = protect_one(run, attack, item, sam, progress)
            progress.end()
            print(summary, flush=True)
        except uad.UADError as e:
            failures.append(f"{attack}: {e}")
            progress.error(failures[-1])
        except (torch.OutOfMemoryError, MemoryError):
            failures.append(f"{attack}: {item.image}: out of memory on {run.device}")
            progress.error(failures[-1])
    progress.end()
    del sam
    release_memory(run.device)


def release_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------------------------
# Stage 2: score


def score_stage(run: Run, failures: List[str]) -> None:
    work = []  # (model, checkpoint, item, variants to score)
    for model, checkpoint in run.models:
        for item in run.items:
            missing = [
                v
                for v in run.variants()
                if run.score_key(model, checkpoint, v, item) is not None
                and run.score_record(model, checkpoint, v, item) is None
            ]
            if missing:
                work.append((model, checkpoint, item, missing))
    total = len(run.models) * len(run.items)
    say(
        run,
        f"score: {len(run.models)} model(s) x {len(run.items)} image(s) x "
        f"{len(run.variants())} (clean + {len(run.attacks)} attack(s)), "
        f"{total - len(work)} image(s) x model(s) done earlier, {len(work)} to do",
    )
    index, bad = 0, set()
    progress = unsegment.progress.Progress(quiet=run.args.quiet)
    for model, checkpoint in run.models:
        mine = [w for w in work if w[0] == model]
        if not mine:
            continue
        started = time.monotonic()
        segmenter = load_model(model, checkpoint, run.device, run.args.quiet, run.args.fastsam_rgb)
        predictor = segmenter.new_predictor()
        progress.items_started += time.monotonic() - started  # the pace is of scoring alone
        for _, _, item, variants in mine:
            index += 1
            if item.name in bad:  # reported for the first model already
                continue
            progress.item(index - 1, len(work), f"score {model} {item.image.name}")
            try:
                line = score_item(run, model, checkpoint, item, variants, predictor, progress)
                progress.end()
                print(line, flush=True)
            except uad.UADError as e:
                bad.add(item.name)  # e.g. a corrupt annotation file: the same for every model
                failures.append(str(e))
                progress.error(failures[-1])
            except (torch.OutOfMemoryError, MemoryError):
                failures.append(f"{model}: {item.image}: out of memory on {run.device}")
                progress.error(failures[-1])
        del segmenter, predictor
        release_memory(run.device)
    progress.end()


def score_item(run: Run, model, checkpoint, item: Item, variants, predictor, progress) -> str:
    """Scores one image's clean and protected versions with one model; records each."""
    args = run.args
    clean = ev.read_rgb(item.image, args.max_pixels, progress)
    objects = ev.read_annotations(item.annotations, clean.shape[:2], args.max_masks)

    def prompts_of(variant):  # drawn, or read from the authors' logs of the variant's row
        if args.log_prompts is None:
            return ev.sample_prompts(objects, item.name, args.seed, args.points, args.boxes)
        found = authors_logs.read_prompts(
            run.log_folder(variant), item.name, len(objects), clean.shape[:2]
        )
        return [ev.Prompt(*p) for p in found]

    clean_prompts = prompts_of(CLEAN)
    means = []
    for variant in variants:
        prompts = prompts_of(variant)
        if variant == CLEAN:
            path, rgb = item.image, clean
        else:
            path = run.protected_path(variant, item)
            rgb = ev.read_rgb(path, args.max_pixels, progress)
            ev.check_sizes(ev.Pair(item.image, path), clean, rgb)
        started = time.perf_counter()
        ious = score_image(predictor, rgb, prompts, objects)
        record = {
            "key": run.score_key(model, checkpoint, variant, item),
            "size": [clean.shape[1], clean.shape[0]],
            "prompts": [[p.object, p.kind, list(p.coords)] for p in prompts],
            "iou": ious,
            "seconds": time.perf_counter() - started,
        }
        if prompts != clean_prompts:  # the aa row on AA's logged prompts: the clean image too
            record["clean_iou"] = score_image(predictor, clean, prompts, objects)
        write_record(run.scored_path(model, variant, item), record)
        means.append(f"{variant} {np.mean(ious):.2f}")
    return f"scored {model}/{item.name}: mIoU " + ", ".join(means)


# -----------------------------------------------------------------------------------------------
# Stage 3: the table


@dataclass
class Table:
    images: List[str]  # the images in every cell: protected by every attack, scored by every model
    summary: Dict[str, Dict[str, Dict[str, ev.Metrics]]]  # variant -> model -> prompt type
    quality: Dict[str, ev.QualitySummary]  # attack -> quality of its files
    protect_seconds: Dict[str, float]  # attack -> seconds per image
    score_seconds: Dict[str, Dict[str, float]]  # model -> variant -> seconds per image
    passes: Dict[str, list]  # attack -> [encoder forwards, backwards] per image


def build_table(run: Run) -> Optional[Table]:
    """Pools every complete image's records (eval.summarise_rows); None if there is none."""
    names = [m for m, _ in run.models]
    rows = {v: [] for v in run.variants()}  # variant -> eval.ImageResult per image
    protect_seconds = {a: [] for a in run.attacks}
    score_seconds = {m: {v: [] for v in run.variants()} for m in names}
    images = []
    for item in run.items:
        protected = {a: run.protect_record(a, item) for a in run.attacks}
        scores = {
            (m, v): run.score_record(m, c, v, item) for m, c in run.models for v in run.variants()
        }
        if None in protected.values() or None in scores.values():
            continue
        images.append(item.name)
        reference = scores[(names[0], CLEAN)]
        for variant in run.variants():
            # each variant's own prompts (the aa row's differ with --log-prompts), and the clean
            # image's IoU on them
            clean_ious = {
                m: scores[(m, variant)].get("clean_iou", scores[(m, CLEAN)]["iou"]) for m in names
            }
            prompts = []
            for j, (obj, kind, coords) in enumerate(scores[(names[0], variant)]["prompts"]):
                prompts.append(
                    ev.PromptResult(
                        obj,
                        kind,
                        coords,
                        iou={m: scores[(m, variant)]["iou"][j] for m in names},
                        clean_iou={m: clean_ious[m][j] for m in names},
                    )
                )
            quality = protected.get(variant) or {"linf": 0, "psnr": None, "ssim": 1.0}
            metrics = {
                m: {
                    k: ev.summarise_ious(v)
                    for k, v in ev.per_kind(prompts, [p.iou[m] for p in prompts]).items()
                }
                for m in names
            }
            rows[variant].append(
                ev.ImageResult(
                    name=item.image.name,
                    clean=str(item.image),
                    adv=str(item.image if variant == CLEAN else run.protected_path(variant, item)),
                    size=reference["size"],
                    reference="annotations",
                    objects=len({p.object for p in prompts}),
                    linf=quality["linf"],
                    psnr=quality["psnr"],
                    ssim=quality["ssim"],
                    metrics=metrics,
                    seconds={m: scores[(m, variant)]["seconds"] for m in names},
                    prompts=prompts,
                )
            )
            for m in names:
                score_seconds[m][variant].append(scores[(m, variant)]["seconds"])
        for attack in run.attacks:
            protect_seconds[attack].append(protected[attack]["seconds"])
    if not images:
        return None
    return Table(
        images=images,
        summary={v: ev.summarise_rows(r, names, annotated=True) for v, r in rows.items()},
        quality={a: ev.summarise_quality(rows[a]) for a in run.attacks},
        protect_seconds={a: float(np.mean(s)) for a, s in protect_seconds.items()},
        score_seconds={
            m: {v: float(np.mean(s)) for v, s in d.items()} for m, d in score_seconds.items()
        },
        passes={a: list(attack_passes(a, run.configs[a])) for a in run.attacks},
    )


def cell(value, paper=None) -> str:
    text = ev.format_number(value)
    return text if paper is None else f"{text} ({paper:.2f})"


def differences(args) -> List[str]:
    """What differs from the paper's evaluation, with this run's settings: the table's note."""
    release = (
        "the authors' for every attack but noise (--release authors: PGD on the padded 1024 "
        "input, truncated to uint8 there and resized back bilinearly): NOT within eps, see L-inf"
        if args.release == "authors"
        else "ours, exactly the optimised perturbation within eps (theirs: PGD on the padded "
        "1024 input, truncated to uint8 there and resized back, not within eps; --release authors)"
    )
    prompts = (
        f"their logs' ({args.log_prompts}; UAD's for every row but aa, AA's for aa)"
        if args.log_prompts is not None
        else "drawn from --seed, not theirs: about +/-0.8 mIoU of sampling noise at 1000 images "
        "(--log-prompts)"
    )
    fastsam = "RGB as the paper's code" if args.fastsam_rgb else "BGR (--fastsam-rgb: theirs, RGB)"
    return [
        "what differs from the paper's evaluation (docs/reproduce.md#like-with-like):",
        f"- release: {release};",
        f"- prompts: {prompts};",
        f"- FastSAM: {fastsam} into ultralytics; its current predictor replaces a near-full-image "
        "box after cropping that box's mask, theirs (8.0.120) before, keeping the mask uncropped;",
        f"- aa: {'L2, as theirs' if args.aa_distance == 'l2' else '1 - cosine (theirs: L2; --aa-distance l2)'}"
        " towards another image of the set (theirs: any of sa_1..sa_1000, unseeded, maybe itself).",
    ]


def format_table(run: Run, table: Table) -> str:
    head = ["attack", "model"] + [f"{m} {k}" for m in ("mIoU", "ASR@50") for k in KINDS]
    head.append("L-inf")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant in run.variants():
        linf = table.quality[variant].linf_max if variant in table.quality else 0
        for model, kinds in table.summary[variant].items():
            mious, asrs = [], []
            for kind in KINDS:
                paper_miou, paper_asr = paper_numbers(variant, model, kind)
                mious.append(cell(kinds[kind].miou, paper_miou))
                asrs.append(cell(kinds[kind].asr50, paper_asr))
            row = [variant, model, *mious, *asrs, f"{linf}/255"]
            lines.append("| " + " | ".join(row) + " |")
    clean = table.summary[CLEAN]
    counts = {k: next(iter(clean.values()))[k].count for k in KINDS}
    lines += [
        f"{len(table.images)} image(s), {counts['point']} point and {counts['box']} box prompts "
        "per attack and model; in brackets the paper's numbers (1000 SA-1B images, from the "
        "authors' logs; docs/reproduce.md); L-inf: the largest distance of a file to its image",
        *differences(run.args),
        "clean mIoU: " + ", ".join(f"{m} {k['all'].miou:.2f}" for m, k in clean.items()),
        "image quality: "
        + "; ".join(
            f"{a} L-inf max {q.linf_max}/255, PSNR "
            + ("inf" if q.psnr_mean is None else f"{q.psnr_mean:.2f} dB")
            + f", SSIM {q.ssim_mean:.4f}"
            for a, q in table.quality.items()
        ),
    ]
    lines += format_cost(table).splitlines()
    return "\n".join(lines)


def format_cost(table: Table) -> str:
    protect = ", ".join(
        f"{a} {s:.2f} (encoder passes: {table.passes[a][0]} forward, {table.passes[a][1]} backward)"
        for a, s in table.protect_seconds.items()
    )
    score = ", ".join(
        f"{m} {sum(s.values()):.2f} (" + ", ".join(f"{v} {t:.2f}" for v, t in s.items()) + ")"
        for m, s in table.score_seconds.items()
    )
    whole = sum(table.protect_seconds.values()) + sum(
        sum(s.values()) for s in table.score_seconds.values()
    )
    return (
        f"seconds per image, protect: {protect}\n"
        f"seconds per image, score: {score}\n"
        f"seconds per image, whole pipeline: {whole:.2f}"
    )


def package_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def source_commit() -> Optional[str]:
    """The project's git commit, "+" if the work tree differs from it; None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def device_info(device) -> dict:
    info = {"device": str(device), "threads": torch.get_num_threads(), "cpu": platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table_json(run: Run, table: Table, failures: List[str]) -> dict:
    args = run.args
    cells = []
    for variant in run.variants():
        for model, kinds in table.summary[variant].items():
            for kind in KINDS:
                m = kinds[kind]
                paper_miou, paper_asr = paper_numbers(variant, model, kind)
                cells.append(
                    {
                        "attack": variant,
                        "model": model,
                        "prompts": kind,
                        "miou": m.miou,
                        "asr50": m.asr50,
                        "asr10": m.asr10,
                        "count": m.count,
                        "clean_miou": m.clean_miou,
                        "paper_miou": paper_miou,
                        "paper_asr50": paper_asr,
                        "linf_max": table.quality[variant].linf_max if variant != CLEAN else 0,
                    }
                )
    return {
        "settings": {
            "sa1b": str(args.sa1b) if args.sa1b else None,
            "images_requested": args.images,
            "attacks": {a: dataclasses.asdict(c) for a, c in run.configs.items()},
            "surrogate": run.surrogate,
            "models": {m: checkpoint_id(c) for m, c in run.models},
            "prompts": run.prompts,
            "max_pixels": args.max_pixels,
            "seed": args.seed,
            "release": args.release,
            "aa_distance": args.aa_distance,
        },
        "versions": package_versions(),
        "commit": source_commit(),
        "device": device_info(run.device),
        "images": table.images,
        "failures": failures,
        "table": cells,
        "quality": {a: dataclasses.asdict(q) for a, q in table.quality.items()},
        "seconds_per_image": {
            "protect": table.protect_seconds,
            "score": table.score_seconds,
        },
        "encoder_passes": table.passes,
    }


def table_csv(data: dict) -> str:
    """One line per attack (and clean) x model x prompt type: the numbers, then what made them
    (the attack's budget and steps, the model's checkpoint, seed, device, versions, commit)."""
    settings, versions = data["settings"], data["versions"]
    out = io.StringIO()
    writer = None
    for c in data["table"]:
        config = settings["attacks"].get(c["attack"], {})
        row = {
            **c,
            "images": len(data["images"]),
            "eps": config["eps"] * 255 if config else None,
            "steps": config.get("steps"),
            "deform_steps": config.get("deform_steps") if config.get("method") == "uad" else None,
            "surrogate": settings["surrogate"]["model"] if config else None,
            "checkpoint": settings["models"][c["model"]]["path"],
            "seed": settings["seed"],
            "release": settings["release"],
            "device": data["device"].get("gpu", data["device"]["device"]),
            "torch": versions.get("torch"),
            "segment_anything": versions.get("segment-anything"),
            "commit": data["commit"],
        }
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(row), lineterminator="\n")
            writer.writeheader()
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


# -----------------------------------------------------------------------------------------------
# Command line


def say(run: Run, line: str) -> None:
    if not run.args.quiet:
        print(unsegment.progress.process_tag() + line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = unsegment.cli.Parser(
        prog="reproduce.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    count, positive = ev.number(int, 0), ev.number(int, 1)
    add("--sa1b", type=Path, metavar="DIR", help="folder of SA-1B sa_N.jpg + sa_N.json")
    add(
        "--images",
        type=positive,
        default=1000,
        metavar="N",
        help="the first N images (%(default)s)",
    )
    add(
        "--attacks",
        default="paper,reference,authors,aa,noise",
        metavar="LIST",
        help=f"comma-separated, of {', '.join(ATTACKS)} (%(default)s)",
    )
    add(
        "--models",
        default="vit_b,vit_l,vit_h",
        metavar="LIST",
        help="eval.py's NAME[=CHECKPOINT],...; no path: the official file (%(default)s)",
    )
    add("--out", type=Path, metavar="RUN_DIR", help="where everything goes; rerun to resume")
    add(
        "--surrogate",
        default="vit_b",
        choices=[*unsegment.models.SAM_ARCHS, "sam_vit"],
        metavar="{" + ",".join(unsegment.models.SAM_ARCHS) + ",sam_vit}",
        help="the attacks' SAM (%(default)s); sam_vit: any ViT shape, --surrogate-checkpoint "
        "required (docs/trained.md)",
    )
    add("--surrogate-checkpoint", type=Path, metavar="PATH", help="its weights (official file)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (%(default)s)")
    add(
        "--seed",
        type=count,
        default=0,
        metavar="N",
        help="attacks, prompts, aa targets (%(default)s)",
    )
    for flag, kind, what in [
        ("--eps", float, "L-infinity budget in 1/255 (8)"),
        ("--alpha", float, "PGD step in 1/255 (2)"),
        ("--steps", count, "PGD steps (40)"),
        ("--deform-steps", count, "deformation steps (40)"),
        ("--proxy-steps", count, "the paper preset's proxy PGD steps per deformation step (4)"),
    ]:
        add(flag, type=kind, metavar="X" if kind is float else "N", help=what)
    add(
        "--layers", type=unsegment.cli.block_list, metavar="I,J,..", help="feature blocks (3,4,5,6)"
    )
    add("--dtype", choices=("float32", "bfloat16"), help="encoder autocast (float32)")
    add(
        "--points",
        type=count,
        default=5,
        metavar="N",
        help="point prompts per object (%(default)s)",
    )
    add("--boxes", type=count, default=3, metavar="N", help="box prompts per object (%(default)s)")
    add(
        "--max-masks",
        type=positive,
        default=10,
        metavar="N",
        help="objects per image (%(default)s)",
    )
    add(
        "--max-pixels",
        type=positive,
        default=unsegment.images.MAX_PIXELS,
        metavar="N",
        help="refuse larger images, against decompression bombs (%(default)s)",
    )
    add(
        "--cost",
        nargs="?",
        const=ev.BENCH_SIZE,
        type=ev.image_size,
        metavar="WxH",
        help="time the pipeline on one synthetic %dx%d image, random-init weights" % ev.BENCH_SIZE,
    )
    reproduction = "for reproduction: "
    add(
        "--release",
        choices=("exact", "authors"),
        default="exact",
        help="exact: within eps, as uad.py (%(default)s); authors: "
        + "as the authors' code releases, BREAKING THE EPS PROMISE, "
        + reproduction
        + "PGD on SAM's padded, normalised 1024 input, truncated to uint8 there, resized back "
        + "bilinearly (every attack but noise; needs opencv-python)",
    )
    add(
        "--aa-distance",
        choices=authors.DISTANCES,
        default="cosine",
        help=reproduction + "the aa baseline's feature distance; l2: their AA's (%(default)s)",
    )
    add("--log-prompts", type=Path, metavar="DIR", help=reproduction + LOG_PROMPTS_HELP)
    add("--fastsam-rgb", action="store_true", help=ev.FASTSAM_RGB_HELP)
    add("--quiet", action="store_true", help="no progress lines")
    add(
        "--shard",
        type=distributed.shard,
        metavar="K/N",
        help="protect and score images K, K+N, ... only; once every shard is done, the same "
        "command without --shard builds the table (torchrun needs none: docs/scale.md)",
    )
    return p


LOG_PROMPTS_HELP = (
    "score the prompts the authors' logs hold, DIR = their exp/log/benchmark (UAD/ for every "
    "row but aa, AA/ for aa; files N_ATTACK.json for sa_N)"
)


def check_args(parser, args) -> None:
    if args.points + args.boxes == 0:
        parser.error("--points and --boxes are both 0: nothing to score")
    if args.cost is None and (args.sa1b is None or args.out is None):
        parser.error("--sa1b and --out are required (unless --cost)")


def prepare(args, items: List[Item], targets_needed: bool):
    """Everything checkable before a model loads: returns (device, the usable items, one line
    per unusable one); UADError for anything that stops the run. Annotation files are read
    when scored (a corrupt one leaves its image out then)."""
    device = unsegment.models.resolve_device(args.device)
    args.attacks = parse_attacks(args.attacks) if isinstance(args.attacks, str) else args.attacks
    for name in args.attacks:
        attack_config(name, args)  # every flag's value, named as uad.py names it
    if args.surrogate_checkpoint is not None:
        unsegment.models.check_checkpoint_file(args.surrogate_checkpoint)
    depth, _ = unsegment.models.encoder_depth(args.surrogate, args.surrogate_checkpoint)
    layers = args.layers if args.layers is not None else uad.UADConfig().layers
    if max(layers) >= depth:
        raise uad.UADError(f"--layers: {args.surrogate} has blocks 0..{depth - 1}")
    models = ev.parse_models(args.models)
    ev.check_models(models)
    unsegment.images.check_writable(args.out / "table.json", new_folder=True)
    if args.release == "authors" and importlib.util.find_spec("cv2") is None:
        raise uad.UADError(
            "--release authors resizes with OpenCV, as their code: pip install opencv-python"
        )
    folders = []  # the authors' log folders whose prompts are scored
    if args.log_prompts is not None:
        rows = {"aa" if a == "aa" else "uad" for a in args.attacks} | {"uad"}
        folders = [args.log_prompts / authors_logs.FOLDERS[row] for row in sorted(rows)]
        for folder in folders:
            if not folder.is_dir():
                raise uad.UADError(f"{folder}: no such folder of the authors' logs")
    items, failures = check_items(items, args.max_pixels, folders)
    if not items:
        raise uad.UADError(f"none of the {len(failures)} image(s) can be used")
    if targets_needed and len(items) < 2 and "aa" in args.attacks:
        raise uad.UADError("the aa baseline needs at least 2 images: its targets are others")
    return device, items, failures


def execute(run: Run, failures: List[str], share=distributed.Share()) -> int:
    """The three stages; prints the table and writes table.json and table.csv. A share of a
    split run protects and scores its images; rank 0 builds the table from every rank's records
    once all are done, a --shard run leaves that to a run without --shard."""
    everything, run.items, mine = run.items, share.take(run.items), []
    protect_stage(run, mine)
    score_stage(run, mine)
    run.items, ranks = everything, share.collect(mine)
    share.close()
    if not share.main:
        return 0  # rank 0 counts this rank's failures
    failures = failures + sorted(f for rank in ranks for f in rank)
    if share.shard[1] > 1:
        print(
            f"shard {share.shard[0]}/{share.shard[1]} done, {len(failures)} failure(s); once "
            "every shard is done, the same command without --shard builds the table"
        )
        return 1 if failures else 0
    table = build_table(run)
    if table is None:
        print(
            "error: no image was protected by every attack and scored by every model",
            file=sys.stderr,
        )
        return 1
    print(format_table(run, table))
    data = table_json(run, table, failures)
    texts = {
        run.out / "table.json": json.dumps(data, indent=1, allow_nan=False) + "\n",
        run.out / "table.csv": table_csv(data),
    }
    for path, text in texts.items():
        ev.write_text(path, text)
    print(f"wrote {run.out / 'table.json'} and {run.out / 'table.csv'}")
    if failures:
        print(
            f"error: {len(failures)} failure(s), see above; those images are left out",
            file=sys.stderr,
        )
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(parser, args)
    except SystemExit as e:  # a usage error (already one line), or --help
        return e.code
    try:
        if args.cost is not None:
            return run_cost(args)
        share = distributed.share_of(args.shard)
        args.device = distributed.device_name(share, args.device)
        progress = unsegment.progress.Progress(quiet=args.quiet or not share.main)
        items = sa1b_images(args.sa1b, args.images, progress)
        device, items, failures = prepare(args, items, True)
        for line in failures if share.main else []:  # every rank checks every image
            print(f"error: {line}", file=sys.stderr)
        distributed.start(share, device)
        run = Run(args, items, choose_targets(items, args.seed) if len(items) > 1 else {}, device)
        say(
            run,
            f"reproduce: {len(items)} image(s) of {args.sa1b}"
            + (f" ({len(failures)} left out)" if failures else "")
            + f", attacks {','.join(run.attacks)}, models {','.join(m for m, _ in run.models)}, "
            f"surrogate {args.surrogate}, seed {args.seed}, {device} -> {args.out}",
        )
        return execute(run, failures, share)
    except uad.UADError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# -----------------------------------------------------------------------------------------------
# --cost: the pipeline on one synthetic SA-1B-sized image with random-init weights


def synthetic_sa1b(folder: Path, size, count: int, seed: int) -> None:
    """`count` SA-1B-like pairs sa_1.jpg + sa_1.json ...: smooth random colours, and as
    annotations 10 rectangles of growing size (uncompressed COCO RLE)."""
    width, height = size
    rng = np.random.default_rng(seed)
    for n in range(1, count + 1):
        small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(
            folder / f"sa_{n}.jpg", quality=90
        )
        annotations = []
        for i in range(10):
            mask = np.zeros((height, width), dtype=bool)
            f = (i + 1) / 11
            mask[: max(1, int(f * height)), : max(1, int(f * width))] = True
            flat = mask.flatten(order="F")
            edges = np.flatnonzero(np.diff(flat)) + 1
            runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
            counts = [0] + runs if flat[0] else runs
            segmentation = {"size": [height, width], "counts": counts}
            annotations.append({"segmentation": segmentation, "bbox": list(ev.mask_bbox(mask))})
        (folder / f"sa_{n}.json").write_text(json.dumps({"annotations": annotations}))


def steps_of(config: uad.UADConfig) -> str:
    """The step counts that set an attack's cost, in words."""
    if config.method == "noise":
        return "no steps"
    text = f"{config.steps} PGD steps"
    if config.method == "uad":
        text = f"{config.deform_steps} deformation + " + text
        if uad.uses_fidelity(config):
            text += f", {config.proxy_steps} proxy steps per deformation step"
    return text


def run_cost(args) -> int:
    """Times the whole pipeline on one synthetic image; prints seconds per image per stage."""
    models = ev.parse_models(args.models)
    for name in [args.surrogate, *(m for m, _ in models)]:
        if name not in unsegment.models.SAM_ARCHS:
            raise uad.UADError(
                f"--cost builds {', '.join(unsegment.models.SAM_ARCHS)} only, not {name}"
            )
    with tempfile.TemporaryDirectory(prefix="reproduce-cost-") as tmp:
        tmp = Path(tmp)
        (tmp / "sa1b").mkdir()
        synthetic_sa1b(tmp / "sa1b", args.cost, 2, args.seed)
        paths = {}
        for name in {args.surrogate, *(m for m, _ in models)}:
            torch.manual_seed(0)
            paths[name] = tmp / f"{name}.pth"
            torch.save(unsegment.models.build_sam(name).state_dict(), paths[name])
        args.sa1b, args.out = tmp / "sa1b", tmp / "run"
        args.surrogate_checkpoint = paths[args.surrogate]
        args.models = ",".join(f"{m}={paths[m]}" for m, _ in models)
        device, items, failures = prepare(args, sa1b_images(args.sa1b, 2), False)
        if failures:
            raise uad.UADError(failures[0])
        # one image is protected and scored; the other is only its aa target
        run = Run(args, items[:1], {items[0].name: items[1]}, device)
        width, height = args.cost
        say(
            run,
            f"cost: one synthetic {width}x{height} image, random-init weights, attacks "
            f"{','.join(run.attacks)}, surrogate {args.surrogate}, models "
            f"{','.join(m for m, _ in run.models)}, {device}, {torch.get_num_threads()} thread(s)",
        )
        failures = []
        protect_stage(run, failures)
        score_stage(run, failures)
        table = build_table(run)
        if failures or table is None:
            raise uad.UADError(failures[0] if failures else "the pipeline produced no table")
        print("steps: " + "; ".join(f"{a} {steps_of(c)}" for a, c in run.configs.items()))
        print(format_cost(table))
        print("(the attack and the scoring alone: models load once per run, files are not timed)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every output is renamed into place whole: rerun to continue
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
