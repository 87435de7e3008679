"""The prompts the authors scored, read from their result logs (for reproduction).

Their benchmark (github.com/jiahaolu97/anything-unsegmentable: exp/benchmark.py, utils.py's
OutputLogger) writes one JSON file per image and attack, LOG_FOLDER/ATTACK/N_ATTACK.json for
SA-1B's sa_N.jpg (ATTACK: UAD, AA, ...), holding every prompt it scored and each model's IoU:

    {"imgid": N, "adv_method": "UAD", "evaluations": {
        "m0_p0": {"prompt": [x, y], "samb": 25.4, "saml": ..., "samh": ..., "fastsam": ...},
        "m0_p5": {"prompt": [x0, y0, x1, y1], ...}, ...}}

mI_pJ is prompt J of annotation I (the first 10 of sa_N.json): up to 5 points, then 3 boxes,
in pixels of the original image. Their prompts are drawn anew for every attack, so each attack's
folder has its own. Nothing of the logs ships with this project: the user points to their clone.
"""

import json
import re
from pathlib import Path
from typing import List, Tuple

import uad

# The folder of each attack's logs in their exp/log/benchmark/, by this project's attack
FOLDERS = {"uad": "UAD", "aa": "AA"}

Prompt = Tuple[int, str, Tuple[int, ...]]  # (annotation index, "point" | "box", coordinates)


def image_number(name: str) -> int:
    """N of SA-1B's sa_N (a file's stem)."""
    match = re.fullmatch(r"sa_(\d+)", name)
    if match is None:
        raise uad.UADError(f"{name}: not an SA-1B name sa_N, which the authors' logs are keyed by")
    return int(match.group(1))


def log_file(folder: Path, name: str) -> Path:
    """The log of image `name` (sa_N) in one attack's folder: the one file N_*.json there."""
    number = image_number(name)
    found = sorted(folder.glob(f"{number}_*.json"))
    if len(found) != 1:
        what = "no log" if not found else f"{len(found)} logs"
        raise uad.UADError(f"{folder}: {what} {number}_ATTACK.json of {name}")
    return found[0]


def read_prompts(folder: Path, name: str, objects: int, size: Tuple[int, int]) -> List[Prompt]:
    """The prompts their log in `folder` holds for image `name` (sa_N), annotation by annotation
    and in the order drawn, checked against the image's `objects` annotations (those scored) and
    its size (H, W). UADError naming the file for anything else."""
    path = log_file(folder, name)
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise uad.UADError(f"{path}: cannot be read as JSON ({e})") from None
    evaluations = log.get("evaluations") if isinstance(log, dict) else None
    if not isinstance(evaluations, dict) or log.get("imgid") != image_number(name):
        raise uad.UADError(f"{path}: not the authors' log of {name} (imgid, evaluations)")
    h, w = size
    prompts = {}
    for key, entry in evaluations.items():
        match = re.fullmatch(r"m(\d+)_p(\d+)", key)
        coords = entry.get("prompt") if isinstance(entry, dict) else None
        if (
            match is None
            or not isinstance(coords, list)
            or len(coords) not in (2, 4)
            or not all(type(v) is int for v in coords)
        ):
            raise uad.UADError(f"{path}: {key}: expected mI_pJ with a prompt of 2 or 4 integers")
        obj = int(match.group(1))
        inside = all(0 <= v < w for v in coords[0::2]) and all(0 <= v < h for v in coords[1::2])
        if obj >= objects or not inside:
            raise uad.UADError(
                f"{path}: {key} {coords}: annotation {obj} is not among the {objects} scored (--max-masks) "
                f"or not inside the {w}x{h} image"
            )
        kind = "point" if len(coords) == 2 else "box"
        prompts[(obj, int(match.group(2)))] = (obj, kind, tuple(coords))
    if not prompts:
        raise uad.UADError(f"{path}: holds no prompt")
    return [prompts[k] for k in sorted(prompts)]
