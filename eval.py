"""Scores how well the Segment Anything family still segments protected (adversarial) images.

    python eval.py --clean CLEAN --adv ADV --models vit_b=sam_vit_b.pth [--annotations DIR]

models: vit_b, vit_l, vit_h, sam_vit, hq_vit_b, hq_vit_l, hq_vit_h, hq_vit_tiny, mobile_sam,
sam2_t, sam2_s, sam2_b+, sam2_l, sam2.1_t, sam2.1_s, sam2.1_b+, sam2.1_l, sam3, fastsam
(docs/models.md).
The protocol (reference masks, prompts, metrics, probes): docs/evaluation.md.
"""

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

import uad
import unsegment.authors_logs
import unsegment.cli
import unsegment.images
import unsegment.models
import unsegment.probes
import unsegment.progress
import unsegment.report
import warp_kernel
from unsegment import distributed

PROMPT_KINDS = ("point", "box")
BOX_JITTER = (0.9, 1.1)  # range of the factor on the bbox's width and height
BENCH_SIZE = (2250, 1500)  # W, H of --bench's synthetic image: SA-1B's size

# -----------------------------------------------------------------------------------------------
# Reference objects: SA-1B annotations (COCO run-length encoding)


@dataclass
class RefObject:
    mask: np.ndarray  # (H, W) bool
    bbox: Tuple[float, float, float, float]  # x, y, w, h in pixels, COCO convention


def decode_rle_string(counts: str) -> List[int]:
    """Run lengths of COCO's compressed RLE string (the inverse of pycocotools' rleToString).

    Each run is a variable-length integer in 5-bit groups, least significant first, stored as
    chr(48 + group), 0x20 marking "more groups follow" and 0x10 in the last group the sign.
    From the fourth run on, the stored value is the difference to the run two places back.
    """
    runs, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p == len(counts):
                raise ValueError("counts string ends inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} cannot occur in a counts string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # negative: sign-extend
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rle_size(segmentation: dict) -> Tuple[int, int]:
    """(H, W) of a COCO RLE, read without decoding it; ValueError if it is not an RLE."""
    if not isinstance(segmentation, dict) or "size" not in segmentation:
        raise ValueError("segmentation is not an RLE ({'size', 'counts'}); polygons are not read")
    h, w = (int(v) for v in segmentation["size"])
    return h, w


def decode_rle(segmentation: dict) -> np.ndarray:
    """Decodes a COCO RLE, compressed (string counts, as in SA-1B) or not (list of counts).

    Args:
      segmentation: {"size": [H, W], "counts": str | bytes | list of int}. Runs alternate
        background and foreground, starting with background, over pixels in column-major
        (Fortran) order.

    Returns:
      (H, W) bool mask. Raises ValueError if the RLE is malformed.
    """
    h, w = rle_size(segmentation)
    counts = segmentation.get("counts")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        runs = decode_rle_string(counts)
    elif isinstance(counts, list) and all(isinstance(c, int) for c in counts):
        runs = counts
    else:
        raise ValueError("RLE counts must be a string or a list of integers")
    runs = np.asarray(runs, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != h * w:
        raise ValueError(f"RLE runs add up to {runs.sum()} pixels, the size says {h}x{w}={h * w}")
    flat = np.repeat(np.arange(runs.size) % 2 == 1, runs)
    return flat.reshape((h, w), order="F")


def encode_rle(mask: np.ndarray) -> dict:
    """The compressed COCO RLE of an (H, W) bool mask, as SA-1B stores it (decode_rle's inverse):
    {"size": [H, W], "counts": str}."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    runs = [0] + runs if flat.size and flat[0] else runs  # the first run is background
    out = []
    for i, x in enumerate(runs):
        x = x - runs[i - 2] if i > 2 else x
        more = True
        while more:  # 5-bit groups, least significant first; 0x10 of the last is the sign
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + (0x20 if more else 0) + 48))
    return {"size": list(mask.shape), "counts": "".join(out)}


def mask_bbox(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """Tight box (x, y, w, h) of a non-empty (H, W) bool mask, w = x_max - x_min + 1."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def check_annotation_file(path: Path) -> None:
    if not path.is_file():
        problem = "is a folder, not a JSON file" if path.is_dir() else "no such annotation file"
        raise uad.UADError(f"{path}: {problem}")


def read_annotations(path: Path, image_size: Tuple[int, int], max_masks: int) -> List[RefObject]:
    """The first `max_masks` annotations of an SA-1B JSON file, empty masks skipped.

    Args:
      path: the JSON file, {"annotations": [{"segmentation": RLE, "bbox": [x, y, w, h]}, ...]}.
      image_size: (H, W) of the clean image; every mask must have this size.
      max_masks: how many annotations to read, counted before skipping empty masks.

    Returns:
      RefObjects in file order. Any problem raises UADError naming the file.
    """
    check_annotation_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise uad.UADError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise uad.UADError(f"{path}: cannot read ({e.strerror or e})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise uad.UADError(f"{path}: no 'annotations' list")
    objects = []
    for i, ann in enumerate(anns[:max_masks]):
        try:
            size = rle_size(ann["segmentation"])
            if size != image_size:  # checked before decoding: a few bytes can declare gigapixels
                raise uad.UADError(
                    f"{path}: annotation {i} is {size[1]}x{size[0]}, "
                    f"the clean image {image_size[1]}x{image_size[0]}"
                )
            mask = decode_rle(ann["segmentation"])
            bbox = tuple(float(v) for v in ann["bbox"])
            if len(bbox) != 4:
                raise ValueError(f"bbox has {len(bbox)} numbers, not 4")
            if not all(map(math.isfinite, bbox)):
                raise ValueError(f"bbox {list(bbox)} is not finite")
        except KeyError as e:
            raise uad.UADError(f"{path}: annotation {i} has no {e.args[0]!r}") from None
        except (ValueError, TypeError, AttributeError, OverflowError) as e:
            raise uad.UADError(f"{path}: annotation {i}: {e}") from None
        if mask.any():
            objects.append(RefObject(mask, bbox))
    if not objects:
        raise uad.UADError(f"{path}: no non-empty annotation to prompt")
    return objects


# -----------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    object: int  # index of the reference object it was drawn from
    kind: str  # "point" | "box"
    coords: Tuple[int, ...]  # (x, y) or (x0, y0, x1, y1), pixels of the original image


def seed_prompts(seed: int, name: str, obj: int, stream: int) -> np.random.Generator:
    """The random stream of one object's points (stream 0) or boxes (stream 1) in image `name`."""
    key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, key, obj, stream])


def sample_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """min(n, area) distinct pixels drawn uniformly inside an (H, W) bool mask.

    Returns (K, 2) int64 (x, y), in the order drawn.
    """
    inside = np.flatnonzero(mask)  # row-major: y * W + x, the order of np.argwhere
    picked = inside[rng.choice(inside.size, size=min(n, inside.size), replace=False)]
    ys, xs = np.divmod(picked, mask.shape[1])
    return np.stack([xs, ys], axis=1)


def jitter_length(length: float, rng: np.random.Generator) -> int:
    """Whole pixels uniform in [int(0.9 length), int(1.1 length)), as the paper's code draws."""
    lo, hi = int(BOX_JITTER[0] * length), int(BOX_JITTER[1] * length)
    return int(rng.integers(lo, hi)) if hi > lo else lo


def jitter_boxes(bbox, n: int, image_size: Tuple[int, int], rng: np.random.Generator):
    """n boxes around bbox (x, y, w, h): centre kept, size jittered, clipped. (n, 4) int XYXY."""
    x, y, w, h = bbox
    cx, cy = x + w / 2, y + h / 2
    height, width = image_size
    boxes = []
    for _ in range(n):
        bw = jitter_length(w, rng)
        bh = jitter_length(h, rng)
        boxes.append(
            [
                max(int(cx - bw / 2), 0),
                max(int(cy - bh / 2), 0),
                min(int(cx + bw / 2), width - 1),
                min(int(cy + bh / 2), height - 1),
            ]
        )
    return np.asarray(boxes, dtype=np.int64).reshape(n, 4)


def sample_prompts(objects: Sequence[RefObject], name: str, seed: int, n_points: int, n_boxes: int):
    """Every object's points then boxes, as a list of Prompt; a function of (seed, name) only."""
    prompts = []
    for i, obj in enumerate(objects):
        for xy in sample_points(obj.mask, n_points, seed_prompts(seed, name, i, 0)):
            prompts.append(Prompt(i, "point", tuple(int(v) for v in xy)))
        boxes = jitter_boxes(obj.bbox, n_boxes, obj.mask.shape, seed_prompts(seed, name, i, 1))
        for box in boxes:
            prompts.append(Prompt(i, "box", tuple(int(v) for v in box)))
    return prompts


def image_prompts(objects: Sequence[RefObject], name: str, args) -> List[Prompt]:
    """The prompts of image `name`: those the authors' logs in args.log_prompts hold for it (see
    unsegment.authors_logs), else sample_prompts' draw."""
    if getattr(args, "log_prompts", None) is None:
        return sample_prompts(objects, name, args.seed, args.points, args.boxes)
    size = objects[0].mask.shape if objects else (0, 0)
    found = unsegment.authors_logs.read_prompts(args.log_prompts, name, len(objects), size)
    return [Prompt(*p) for p in found]


# -----------------------------------------------------------------------------------------------
# Metrics and result rows (the JSON output is these dataclasses, see to_json)


@dataclass
class Metrics:
    """Scores of one model on a set of prompts; IoUs are in percent, None without prompts."""

    miou: Optional[float]  # mean IoU, lower = stronger attack
    asr50: Optional[float]  # % of prompts with IoU < 50
    asr10: Optional[float]  # % of prompts with IoU < 10
    count: int  # prompts
    clean_miou: Optional[float] = None  # annotation mode: the clean image's mIoU


@dataclass
class Quality:
    """An adversarial image as scored against its clean twin."""

    linf: int  # L-inf in 1/255
    psnr: Optional[float]  # dB over all channels; None when the images are identical
    ssim: float  # warp_kernel.ssim, mean over RGB


@dataclass
class PromptResult:
    object: int  # index of the reference object it was drawn from
    kind: str  # "point" | "box"
    coords: List[int]  # (x, y) or (x0, y0, x1, y1), pixels of the original image
    iou: Dict[str, float] = dataclasses.field(default_factory=dict)  # model -> IoU of adv
    clean_iou: Optional[Dict[str, float]] = None  # annotation mode: model -> IoU of clean
    # probe -> "adv" | "clean" (each image through the probe) -> model -> IoU
    probes: Dict[str, Dict[str, Dict[str, float]]] = dataclasses.field(default_factory=dict)


@dataclass
class ProbeScores:
    """One probe's scores of one image pair: the protected and the clean image each through
    the probe, against the same references."""

    adv: Dict[str, Dict[str, Metrics]]  # model -> prompt type
    clean: Dict[str, Dict[str, Metrics]]  # model -> prompt type: what the probe alone does
    linf: int  # Quality's fields: the protected image through the probe against the clean one
    psnr: Optional[float]
    ssim: float


@dataclass
class ImageResult:
    """One scored pair: a row of the JSON's "images"."""

    name: str  # the clean file's name
    clean: str
    adv: str
    size: List[int]  # W, H
    reference: str  # "annotations" | "automatic" | "automatic, unfiltered"
    objects: int
    linf: int  # Quality's fields, flat
    psnr: Optional[float]
    ssim: float
    metrics: Dict[str, Dict[str, Metrics]]  # model -> prompt type ("point", "box", "all")
    seconds: Dict[str, float]  # model (and "mask_generator") -> seconds
    prompts: List[PromptResult]
    probes: Dict[str, ProbeScores] = dataclasses.field(default_factory=dict)  # --probes, in order


@dataclass
class QualitySummary:
    linf_max: int
    psnr_mean: Optional[float]  # identical images left out; None if all are
    ssim_mean: float
    images: int


@dataclass
class ProbeSummary:
    adv: Dict[str, Dict[str, Metrics]]  # model -> prompt type, pooled over all images
    clean: Dict[str, Dict[str, Metrics]]
    quality: QualitySummary


@dataclass
class Results:
    """What a run found: the JSON output, and what the table and the CSV are made from."""

    mode: str  # "annotations" | "clean-reference"
    settings: dict
    summary: Dict[str, Dict[str, Metrics]]  # model -> prompt type -> pooled over all images
    quality: QualitySummary
    seconds_per_image: Dict[str, float]
    images: List[ImageResult]
    failures: List[str]
    probes: Dict[str, ProbeSummary] = dataclasses.field(default_factory=dict)  # --probes

    @property
    def annotated(self) -> bool:
        return self.mode == "annotations"


ANNOTATION_ONLY = ("clean_miou", "clean_iou")  # fields that exist in annotation mode only


def to_json(obj, annotated: bool):
    """A result dataclass as plain dicts; the clean image's scores only in annotation mode."""
    drop = () if annotated else ANNOTATION_ONLY
    return dataclasses.asdict(obj, dict_factory=lambda kv: {k: v for k, v in kv if k not in drop})


def mask_iou(pred: Optional[np.ndarray], ref: Optional[np.ndarray]) -> float:
    """IoU in percent of two (H, W) bool masks; 100 when both are empty (they agree); 0 when
    either is None, a prompt the model gave no mask for (as the paper's code scores FastSAM)."""
    if pred is None or ref is None:
        return 0.0
    union = np.count_nonzero(pred | ref)
    return 100.0 if union == 0 else 100.0 * np.count_nonzero(pred & ref) / union


def summarise_ious(ious: Sequence[float]) -> Metrics:
    """mIoU, ASR@50 (% IoU < 50), ASR@10 (% IoU < 10) and count of a list of IoUs in percent."""
    a = np.asarray(ious, dtype=np.float64)
    if a.size == 0:
        return Metrics(None, None, None, 0)
    return Metrics(
        float(a.mean()), float(100 * np.mean(a < 50)), float(100 * np.mean(a < 10)), int(a.size)
    )


def measure_quality(clean: np.ndarray, adv: np.ndarray) -> Quality:
    """L-inf (in 1/255), PSNR (dB, None if identical) and SSIM of two (H, W, 3) uint8 images."""
    diff = clean.astype(np.int16) - adv.astype(np.int16)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    ssim = warp_kernel.ssim(uad.to_tensor(clean), uad.to_tensor(adv), data_range=1.0)
    return Quality(
        int(np.abs(diff).max()), 10 * math.log10(255**2 / mse) if mse > 0 else None, float(ssim[0])
    )


def summarise_rows(rows: Sequence[ImageResult], model_names: Sequence[str], annotated: bool):
    """Pooled Metrics per model and prompt type over every prompt of every row."""
    summary = {}
    for name in model_names:
        summary[name] = {}
        for kind in (*PROMPT_KINDS, "all"):
            records = [p for r in rows for p in r.prompts if kind in ("all", p.kind)]
            summary[name][kind] = summarise_ious([p.iou[name] for p in records])
            if annotated:
                clean = summarise_ious([p.clean_iou[name] for p in records])
                summary[name][kind].clean_miou = clean.miou
    return summary


def summarise_probes(rows: Sequence[ImageResult], model_names, probes) -> Dict[str, ProbeSummary]:
    """Pooled Metrics and quality per probe, of the protected and the clean image through it."""
    out = {}
    for probe in probes:
        pooled = {"adv": {}, "clean": {}}
        for side, name in ((side, name) for side in pooled for name in model_names):
            pooled[side][name] = {
                kind: summarise_ious(
                    [
                        p.probes[probe][side][name]
                        for r in rows
                        for p in r.prompts
                        if kind in ("all", p.kind)
                    ]
                )
                for kind in (*PROMPT_KINDS, "all")
            }
        quality = summarise_quality([r.probes[probe] for r in rows])
        out[probe] = ProbeSummary(pooled["adv"], pooled["clean"], quality)
    return out


def summarise_quality(rows: Sequence[ImageResult]) -> QualitySummary:
    """Max L-inf, mean PSNR (identical images left out) and mean SSIM over the rows."""
    psnrs = [r.psnr for r in rows if r.psnr is not None]
    return QualitySummary(
        max(r.linf for r in rows),
        float(np.mean(psnrs)) if psnrs else None,
        float(np.mean([r.ssim for r in rows])),
        len(rows),
    )


# -----------------------------------------------------------------------------------------------
# Images: pairing the two inputs, reading


@dataclass
class Pair:
    clean: Path
    adv: Path
    annotations: Optional[Path] = None  # annotation mode: the clean image's JSON file
    size: Optional[Tuple[int, int]] = None  # (H, W) of both images, from check_pair


def image_files(folder: Path) -> List[Path]:
    """The files of `folder` whose extension PIL can open, sorted by name."""
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def check_sizes(pair: Pair, clean: np.ndarray, adv: np.ndarray) -> None:
    """UADError unless the pixels of the pair's two images have the same height and width."""
    (h_clean, w_clean), (h_adv, w_adv) = clean.shape[:2], adv.shape[:2]
    if (h_clean, w_clean) != (h_adv, w_adv):
        raise uad.UADError(
            f"{pair.adv}: adversarial image is {w_adv}x{h_adv}, "
            f"its clean twin {pair.clean} is {w_clean}x{h_clean}"
        )


def check_pair(pair: Pair, max_pixels: Optional[int]) -> None:
    """Both images decode, within max_pixels, and have the same size (then pair.size); UADError
    if not."""
    clean, adv = (unsegment.images.read_image(p, max_pixels).pixels for p in (pair.clean, pair.adv))
    check_sizes(pair, clean, adv)
    pair.size = clean.shape[:2]


def pair_inputs(
    clean: Path, adv: Path, max_pixels: Optional[int] = unsegment.images.MAX_PIXELS, take=list
):
    """Pairs CLEAN and ADV (two files, or two folders matched by file name, else by stem);
    take: this process's share of the sorted clean images (unsegment.distributed.Share.take).

    Returns the good pairs and one error line per clean image that cannot be scored.
    """
    for p in (clean, adv):
        if not p.exists():
            raise uad.UADError(f"{p}: no such file or folder")
    if clean.is_dir() != adv.is_dir():
        raise uad.UADError(f"--clean {clean} and --adv {adv} must be two files or two folders")
    candidates, errors = [], []
    if not clean.is_dir():
        candidates += take([Pair(clean, adv)])
    else:
        adv_files, clean_files = image_files(adv), image_files(clean)
        for c in take(clean_files):
            same_stem = [a for a in adv_files if a.stem == c.stem]
            twin = [a for a in same_stem if a.name == c.name] or same_stem
            if len(twin) == 1:
                candidates.append(Pair(c, twin[0]))
            elif not twin:
                errors.append(f"{c}: no adversarial twin {c.stem}.* in {adv}")
            else:
                errors.append(f"{c}: several adversarial twins in {adv}: {[a.name for a in twin]}")
        if not clean_files:
            raise uad.UADError(f"{clean}: no image files")
    pairs = []
    for pair in candidates:
        try:
            check_pair(pair, max_pixels)
            pairs.append(pair)
        except uad.UADError as e:
            errors.append(str(e))
    return pairs, errors


def read_rgb(
    path: Path, max_pixels: Optional[int], progress: unsegment.progress.Progress
) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; greyscale is replicated, alpha dropped."""
    picture = unsegment.images.read_image(path, max_pixels)
    if picture.frames > 1:
        progress.warn(f"{path}: only the first of its {picture.frames} frames is scored")
    pixels = picture.pixels
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


# -----------------------------------------------------------------------------------------------
# Models: segment-anything, SAM-HQ, MobileSAM, SAM 2 behind one small interface


@dataclass
class Segmenter:
    """A loaded model: factories of its predictors (sharing its weights) and mask generators.

    A predictor has set_image(image) for an (H, W, 3) uint8 RGB image, and
    predict(point_coords, point_labels, box, multimask_output) -> (masks (C, H, W), scores, logits).
    """

    name: str
    new_predictor: Callable[[], object]
    new_mask_generator: Callable[..., object]  # (**settings) -> object with generate(image)
    thresholds: bool = True  # whether the generator filters by --pred-iou-thresh and the like


def parse_models(text: str) -> List[Tuple[str, Optional[str]]]:
    """Parses --models: "vit_b=PATH,vit_h" -> [("vit_b", "PATH"), ("vit_h", None)]."""
    return unsegment.models.model_list(text, list(unsegment.models.MODELS), "model", "--models")


def check_models(specs: Sequence[Tuple[str, Optional[str]]]) -> None:
    """What can be known of the models before any loads: their packages and checkpoint files."""
    for name, checkpoint in specs:
        unsegment.models.import_family(name)
        unsegment.models.check_model_checkpoint(name, checkpoint)  # SAM 3's: the cache's, if none


def load_segmenter(
    name: str, checkpoint: Optional[str], device, quiet: bool = False, fastsam_rgb: bool = False
) -> Segmenter:
    """Loads model `name` (a key of unsegment.models.MODELS, through its load_model), ready to
    predict (fastsam_rgb: see everything_masks)."""
    model = unsegment.models.load_model(name, checkpoint, device, quiet)
    return segmenter_of(name, model, device, fastsam_rgb)


def segmenter_of(name: str, model, device, fastsam_rgb: bool = False) -> Segmenter:
    """The predictors and mask generators of model `name`'s package around a loaded `model`."""
    predictor = unsegment.models.MODELS[name].info.predictor
    if predictor == "sam2":
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        return Segmenter(
            name,
            lambda: SAM2ImagePredictor(model),
            lambda **kw: SAM2AutomaticMaskGenerator(model, **kw),
        )
    if predictor == "sam3":
        return Segmenter(
            name, lambda: sam3_predictor(model), lambda **kw: sam3_mask_generator(model, **kw)
        )
    if predictor == "fastsam":
        return Segmenter(
            name,
            lambda: FastSAMPrompter(model, device, fastsam_rgb),
            lambda **kw: FastSAMPrompter(model, device, fastsam_rgb),
            thresholds=False,
        )
    # segment-anything, SAM-HQ and MobileSAM share segment_anything's API
    module = unsegment.models.import_family(name)
    return Segmenter(
        name,
        lambda: module.SamPredictor(model),
        lambda **kw: module.SamAutomaticMaskGenerator(model, **kw),
    )


def sam3_predictor(model):
    """SAM 3's SAM-style predictor (SAM 2's API) around its tracker, told the feature sizes of
    the model's own input size (the package assumes 1008)."""
    from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor

    predictor, s = SAM3InteractiveImagePredictor(model), model.image_size // model.backbone_stride
    predictor._bb_feat_sizes = [(4 * s, 4 * s), (2 * s, 2 * s), (s, s)]  # strides 3.5, 7, 14
    return predictor


def sam3_mask_generator(model, **settings):
    """SAM 2's automatic mask generator prompting SAM 3's predictor (sam3 has none of its own)."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(model, **settings)
    area = generator.predictor._transforms.max_hole_area  # its min_mask_region_area
    generator.predictor = sam3_predictor(model)
    generator.predictor._transforms.max_hole_area = area
    generator.predictor._transforms.max_sprinkle_area = area
    return generator


# FastSAM as the paper's code runs it: everything mode once per image with these settings (and
# imgsz = max(H, W)), then each prompt selects from those masks
FASTSAM_SETTINGS = dict(retina_masks=True, conf=0.4, iou=0.9)


def everything_masks(model, image: np.ndarray, device, rgb: bool = False) -> np.ndarray:
    """FastSAM's everything mode on an (H, W, 3) uint8 RGB image: (N, H, W) bool masks. rgb:
    hand ultralytics the RGB array, as the paper's code did (--fastsam-rgb, for reproduction)."""
    from ultralytics.models.fastsam import FastSAMPredictor

    h, w = image.shape[:2]
    imgsz = -(-max(h, w) // 32) * 32  # rounded up to the stride, as ultralytics would (it warns)
    settings = dict(FASTSAM_SETTINGS, imgsz=imgsz, device=str(device), save=False, verbose=False)
    predictor = FastSAMPredictor(overrides=settings)
    predictor.setup_model(model=model, verbose=False)
    # ultralytics reads a numpy array as OpenCV's BGR (the paper's code passed RGB)
    result = predictor(source=np.ascontiguousarray(image if rgb else image[..., ::-1]))[0]
    if result.masks is None:
        return np.zeros((0, h, w), dtype=bool)
    return result.masks.data.cpu().numpy() > 0.5  # (N, H, W) at the image's size (retina masks)


def select_fastsam_mask(masks: np.ndarray, point=None, box=None) -> Optional[np.ndarray]:
    """The prediction for one prompt from FastSAM's everything-mode masks, by the rules of the
    authors' FastSAMPrompt (fastsam/prompt.py, which the paper's code calls):

    - a point (x, y): the union of every mask that contains the pixel (point_prompt; it walks
      the masks largest first, which matters only for negative points, and eval.py has none);
    - a box (x0, y0, x1, y1): the one mask of highest IoU with the box, the box's corners rounded
      and clipped to the image and its last row and column left out as in slicing (box_prompt;
      ties go to the first mask in ultralytics' order).

    Args:
      masks: (N, H, W) bool.

    Returns:
      (H, W) bool, or None when no mask contains the point or there is no mask at all.
    """
    if len(masks) == 0:
        return None
    if point is not None:
        x, y = point
        inside = masks[:, y, x]
        return masks[inside].any(axis=0) if inside.any() else None
    h, w = masks.shape[1:]
    x0, y0 = max(round(box[0]), 0), max(round(box[1]), 0)
    x1, y1 = min(round(box[2]), w), min(round(box[3]), h)
    overlap = masks[:, y0:y1, x0:x1].sum(axis=(1, 2))
    union = (y1 - y0) * (x1 - x0) + masks.sum(axis=(1, 2)) - overlap
    iou = np.divide(overlap, union, out=np.zeros(len(masks)), where=union > 0)
    return masks[int(np.argmax(iou))]


class FastSAMPrompter:
    """FastSAM behind the predictor and mask-generator interface of Segmenter: set_image and
    generate run everything mode (see FASTSAM_SETTINGS); predict selects with
    select_fastsam_mask and returns no mask (shape (0, H, W)) where that finds none."""

    def __init__(self, model, device, rgb: bool = False):
        self.model, self.device, self.masks, self.rgb = model, device, None, rgb

    def set_image(self, image: np.ndarray) -> None:
        self.masks = everything_masks(self.model, image, self.device, self.rgb)

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=False):
        point = None if point_coords is None else tuple(int(v) for v in point_coords[0])
        mask = select_fastsam_mask(self.masks, point, box)
        masks = self.masks[:0] if mask is None else mask[None]
        return masks, None, None

    def generate(self, image: np.ndarray) -> List[dict]:
        masks = everything_masks(self.model, image, self.device, self.rgb)
        return [{"segmentation": m} for m in masks]


def predict_mask(predictor, prompt: Prompt) -> Optional[np.ndarray]:
    """The single mask (multimask_output=False) for one prompt: (H, W) bool, or None where the
    model gives none (FastSAM)."""
    if prompt.kind == "point":
        masks, _, _ = predictor.predict(
            point_coords=np.asarray([prompt.coords], dtype=np.float32),
            point_labels=np.ones(1, dtype=np.int64),
            multimask_output=False,
        )
    else:
        masks, _, _ = predictor.predict(
            box=np.asarray(prompt.coords, dtype=np.float32), multimask_output=False
        )
    if len(masks) == 0:  # FastSAM: no mask for this prompt
        return None
    return np.asarray(masks[0]).astype(bool)  # SAM 2 returns 0/1 floats


def find_objects(segmenter: Segmenter, clean: np.ndarray, args) -> Tuple[List[RefObject], str]:
    """Clean-reference mode: the largest masks the automatic mask generator finds (see top)."""
    settings = dict(
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
    )
    how = "automatic"
    masks = [r["segmentation"] for r in segmenter.new_mask_generator(**settings).generate(clean)]
    masks = [m for m in masks if m.any()]
    filtered = args.pred_iou_thresh > 0 or args.stability_score_thresh > 0
    if not masks and filtered and segmenter.thresholds:
        settings.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
        how = "automatic, unfiltered"
        masks = [
            r["segmentation"] for r in segmenter.new_mask_generator(**settings).generate(clean)
        ]
        masks = [m for m in masks if m.any()]
    if not masks:
        raise uad.UADError(f"{segmenter.name}'s automatic mask generator found no object")
    masks.sort(key=lambda m: -int(np.count_nonzero(m)))  # stable: ties keep the generator's order
    return [RefObject(m, mask_bbox(m)) for m in masks[: args.max_masks]], how


# -----------------------------------------------------------------------------------------------
# Scoring


def score_prompts(predictors, prompts, objects: Optional[Sequence[RefObject]]):
    """IoUs of one model on one image pair, one per prompt.

    Args:
      predictors: two predictors of the same model, whose set_image has been given the clean
        and the adversarial image, (H, W, 3) uint8 RGB.
      prompts: list of Prompt.
      objects: the annotated objects (annotation mode), or None: each prompt's reference is
        then the model's own prediction on the clean image.

    Returns:
      (ious, clean_ious): lists of IoU in percent; clean_ious is None without objects.
    """
    on_clean, on_adv = predictors
    ious, clean_ious = [], []
    for prompt in prompts:
        pred_clean, pred_adv = predict_mask(on_clean, prompt), predict_mask(on_adv, prompt)
        if objects is None:
            ious.append(mask_iou(pred_adv, pred_clean))
        else:
            ref = objects[prompt.object].mask
            ious.append(mask_iou(pred_adv, ref))
            clean_ious.append(mask_iou(pred_clean, ref))
    return ious, (clean_ious if objects is not None else None)


def per_kind(prompts: Sequence[Prompt], values: Sequence[float]) -> Dict[str, List[float]]:
    """Splits per-prompt values by prompt type: {"point": [...], "box": [...], "all": [...]}."""
    out = {kind: [v for p, v in zip(prompts, values) if p.kind == kind] for kind in PROMPT_KINDS}
    return {**out, "all": list(values)}


def score_pair(
    pair: Pair, segmenters, predictors, args, progress: unsegment.progress.Progress
) -> ImageResult:
    """Scores one image pair with every model (annotation mode when pair.annotations is set),
    through every probe (--probes); the first probe's scores are the row's own; with --report
    the pair's picture is written."""
    clean = read_rgb(pair.clean, args.max_pixels, progress)
    unprobed = read_rgb(pair.adv, args.max_pixels, progress)
    check_sizes(pair, clean, unprobed)  # again: a file may have changed since check_pair
    probed = {  # (probe, "adv" | "clean") -> the image through it; "none" gives the image itself
        (probe, side): unsegment.probes.apply_probe(image, probe, args.seed, pair.clean.stem)
        for probe in args.probes
        for side, image in (("adv", unprobed), ("clean", clean))
    }
    first = args.probes[0]
    adv = probed[first, "adv"]  # the row's own scores and quality are the first probe's
    annotated = pair.annotations is not None
    seconds = {}
    started = time.perf_counter()
    if annotated:
        objects = read_annotations(pair.annotations, clean.shape[:2], args.max_masks)
        reference = "annotations"
    else:
        try:
            objects, reference = find_objects(segmenters[0], clean, args)
        except uad.UADError as e:
            raise uad.UADError(f"{pair.clean}: {e}") from None
        seconds["mask_generator"] = time.perf_counter() - started
    prompts = image_prompts(objects, pair.clean.stem, args)
    results = [
        PromptResult(p.object, p.kind, list(p.coords), clean_iou={} if annotated else None)
        for p in prompts
    ]
    for result in results:
        result.probes = {probe: {"adv": {}, "clean": {}} for probe in args.probes}
    probes = {
        probe: ProbeScores(
            {}, {}, **dataclasses.asdict(measure_quality(clean, probed[probe, "adv"]))
        )
        for probe in args.probes
    }
    picture = None
    if args.report is not None:
        picture = unsegment.report.Picture(pair.clean.name, clean, unprobed, adv, first, annotated)
    metrics, references = {}, objects if annotated else None
    for segmenter, (on_clean, on_probed) in zip(segmenters, predictors):
        started = time.perf_counter()
        on_clean.set_image(clean)
        for (probe, side), image in probed.items():
            predictor = on_clean  # the probe none leaves the clean image as it is
            if image is not clean:
                predictor = on_probed
                predictor.set_image(image)
            ious, clean_ious = score_prompts((on_clean, predictor), prompts, references)
            by_kind = per_kind(prompts, ious)
            getattr(probes[probe], side)[segmenter.name] = {
                k: summarise_ious(v) for k, v in by_kind.items()
            }
            for result, iou in zip(results, ious):
                result.probes[probe][side][segmenter.name] = iou
            if (probe, side) == (first, "adv"):
                metrics[segmenter.name] = {k: summarise_ious(v) for k, v in by_kind.items()}
                for i, result in enumerate(results):
                    result.iou[segmenter.name] = ious[i]
                    if annotated:
                        result.clean_iou[segmenter.name] = clean_ious[i]
                if picture is not None:
                    picture.add_model(
                        segmenter.name,
                        unsegment.report.pick_prompts(prompts, args.report_objects),
                        references,
                        lambda p: predict_mask(on_clean, p),
                        lambda p: predict_mask(predictor, p),
                        mask_iou,
                    )
        seconds[segmenter.name] = time.perf_counter() - started
        if annotated:
            for kind, v in per_kind(prompts, clean_ious).items():
                metrics[segmenter.name][kind].clean_miou = summarise_ious(v).miou
    if picture is not None:
        unsegment.report.write_picture(args.report, pair.clean.name, picture)
    return ImageResult(
        name=pair.clean.name,
        clean=str(pair.clean),
        adv=str(pair.adv),
        size=[clean.shape[1], clean.shape[0]],
        reference=reference,
        objects=len(objects),
        **dataclasses.asdict(measure_quality(clean, adv)),
        metrics=metrics,
        seconds=seconds,
        prompts=results,
        probes=probes,
    )


def record_path(pair: Pair, args) -> Path:
    return args.records / f"{pair.clean.name}.json"


def record_key(pair: Pair, args, specs) -> dict:
    """What a pair's scores depend on (--records): its files, the models, the scoring flags."""
    files = [pair.clean, pair.adv] + ([pair.annotations] if pair.annotations else [])
    flags = ("points", "boxes", "max_masks", "seed", "probes", "points_per_side")
    flags += ("pred_iou_thresh", "stability_score_thresh", "fastsam_rgb")
    logs = None if args.log_prompts is None else str(args.log_prompts.resolve())
    return {
        "files": [[str(p), distributed.file_sha256(p)] for p in files],
        "models": [[n, None if c is None else str(Path(c).resolve())] for n, c in specs],
        "checkpoint_bytes": [None if c is None else Path(c).stat().st_size for _, c in specs],
        **{flag: getattr(args, flag) for flag in flags},
        "log_prompts": logs,
    }


def record_of(pair: Pair, args, keys) -> Optional[ImageResult]:
    """The pair's row as --records holds it from a run with the same key, or None."""
    if args.records is None:
        return None
    value = distributed.read_record(record_path(pair, args), keys[id(pair)])
    if value is None:
        return None
    value["metrics"] = {
        m: {kind: Metrics(**v) for kind, v in kinds.items()}
        for m, kinds in value["metrics"].items()
    }
    value["prompts"] = [PromptResult(**p) for p in value["prompts"]]
    value["probes"] = {
        probe: ProbeScores(
            **{
                **scores,
                **{
                    side: {
                        m: {k: Metrics(**v) for k, v in kinds.items()} for m, kinds in by.items()
                    }
                    for side, by in scores.items()
                    if side in ("adv", "clean")
                },
            }
        )
        for probe, scores in value.get("probes", {}).items()
    }
    return ImageResult(**value)


# -----------------------------------------------------------------------------------------------
# Output: table, CSV, results files


def format_number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: Results) -> str:
    annotated = results.annotated
    head = ["model", "prompts", "count", "mIoU", "ASR@50", "ASR@10"]
    lines = [head + (["clean mIoU"] if annotated else [])]
    for name, kinds in results.summary.items():
        for kind, m in kinds.items():
            numbers = (m.miou, m.asr50, m.asr10) + ((m.clean_miou,) if annotated else ())
            lines.append([name, kind, str(m.count)] + [format_number(v) for v in numbers])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    text = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in lines
    ]
    q = results.quality
    psnr = "inf (identical)" if q.psnr_mean is None else f"{q.psnr_mean:.2f} dB"
    text.append(
        f"image quality over {q.images} image(s): L-inf max {q.linf_max}/255, "
        f"PSNR mean {psnr}, SSIM mean {q.ssim_mean:.4f}"
    )
    seconds = results.seconds_per_image
    text.append("seconds per image: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    return "\n".join(text)


def format_probe_table(results: Results) -> str:
    """Per probe, model and prompt type: mIoU and ASR@50 of the protected image through the
    probe, the same of the clean image through it, and the protected image's PSNR."""
    head = ["probe", "model", "prompts", "mIoU", "ASR@50", "clean mIoU", "clean ASR@50", "PSNR"]
    lines = [head]
    for probe, scores in results.probes.items():
        psnr = format_number(scores.quality.psnr_mean)
        for name, kinds in scores.adv.items():
            for kind, m in kinds.items():
                c = scores.clean[name][kind]
                numbers = [format_number(v) for v in (m.miou, m.asr50, c.miou, c.asr50)]
                lines.append([probe, name, kind, *numbers, psnr])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in lines
    )


def format_csv(results: Results) -> str:
    """One line per image x model x prompt type, then the pooled summary as image "ALL"."""
    annotated = results.annotated
    fields = ["image", "model", "prompts", "count", "miou", "asr50", "asr10"]
    fields += (["clean_miou"] if annotated else []) + ["linf", "psnr", "ssim", "seconds"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()

    def line(image, model, kind, m: Metrics, linf, psnr, ssim, seconds):
        cells = {"image": image, "model": model, "prompts": kind, **to_json(m, annotated)}
        cells.update(linf=linf, psnr="inf" if psnr is None else psnr, ssim=ssim, seconds=seconds)
        writer.writerow({k: "" if v is None else v for k, v in cells.items()})

    for r in results.images:
        for model, kinds in r.metrics.items():
            for kind, m in kinds.items():
                line(r.name, model, kind, m, r.linf, r.psnr, r.ssim, r.seconds[model])
    q = results.quality
    for model, kinds in results.summary.items():
        mean_seconds = float(np.mean([r.seconds[model] for r in results.images]))
        for kind, m in kinds.items():
            line("ALL", model, kind, m, q.linf_max, q.psnr_mean, q.ssim_mean, mean_seconds)
    return out.getvalue()


def write_text(path: Path, text: str) -> None:
    """Writes `path` whole or not at all (unsegment.images.write_atomically)."""
    # surrogateescape: a file name that is not UTF-8 is written back as the bytes it was
    unsegment.images.write_atomically(path, text.encode("utf-8", errors="surrogateescape"))


# -----------------------------------------------------------------------------------------------
# Benchmark


def run_benchmark(args, specs, device) -> int:
    """Times one synthetic image per model with random-init weights (see --bench)."""
    width, height = args.bench
    if width * height > args.max_pixels:
        raise uad.UADError(f"--bench {width}x{height}: over --max-pixels {args.max_pixels}")
    check_models([(name, None) for name, _ in specs])  # checkpoints are not read
    rng = np.random.default_rng(args.seed)
    clean = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    adv = np.clip(clean + rng.integers(-8, 9, clean.shape), 0, 255).astype(np.uint8)
    objects = []  # rectangles of growing size along the diagonal, as stand-in annotations
    for i in range(args.max_masks):
        mask = np.zeros((height, width), dtype=bool)
        f = (i + 1) / (args.max_masks + 1)
        mask[: max(1, int(f * height)), : max(1, int(f * width))] = True
        objects.append(RefObject(mask, mask_bbox(mask)))
    prompts = sample_prompts(objects, "bench", args.seed, args.points, args.boxes)
    side = args.points_per_side
    print(
        f"benchmark: random-init weights, {width}x{height} image, {len(prompts)} prompts, "
        f"annotation mode (2 encoder passes, {2 * len(prompts)} mask decodes), "
        f"{device}, {torch.get_num_threads()} thread(s)"
    )
    for name, _ in specs:
        torch.manual_seed(0)
        model = unsegment.models.build_model(name).eval().requires_grad_(False).to(device)
        segmenter = segmenter_of(name, model, device)
        predictors = (segmenter.new_predictor(), segmenter.new_predictor())
        started = time.perf_counter()
        for p, image in zip(predictors, (clean, adv)):
            p.set_image(image)
        encode = time.perf_counter() - started
        started = time.perf_counter()
        score_prompts(predictors, prompts, objects)
        decode = time.perf_counter() - started
        print(
            f"{name}: {encode + decode:.2f} s per image "
            f"(encoder {encode:.2f} s for 2 passes, mask decoding and IoU {decode:.2f} s)"
        )
        # what clean-reference mode adds: one run with every candidate kept, as its unfiltered
        # second run does (random weights pass no threshold)
        generator = segmenter.new_mask_generator(
            points_per_side=side, pred_iou_thresh=0.0, stability_score_thresh=0.0
        )
        started = time.perf_counter()
        found = len(generator.generate(clean))
        grid = "everything mode" if not segmenter.thresholds else f"{side}x{side} points"
        print(
            f"{name} automatic mask generator: {time.perf_counter() - started:.2f} s per run "
            f"({grid}, thresholds 0, {found} masks)"
        )
        del model, segmenter, predictors, generator  # one model in memory at a time
    return 0


# -----------------------------------------------------------------------------------------------
# Command line


def number(kind: type, low, high=None, above: bool = False):
    """An argparse type: an int or float at least `low` (above it if `above`), at most `high`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r}: not {what}") from None
        if not (value > low if above else value >= low):
            raise argparse.ArgumentTypeError(
                f"{text}: must be {'above' if above else 'at least'} {low}"
            )
        if high is not None and not value <= high:
            raise argparse.ArgumentTypeError(f"{text}: must be at most {high}")
        return value

    return parse


def image_size(text: str) -> Tuple[int, int]:
    """--bench: WxH in pixels, both at least 16."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if min(width, height) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH, both at least 16")
    return width, height


def probe_list(text: str) -> List[str]:
    """--probes: the names of its probes (unsegment.probes.parse_probes)."""
    try:
        return unsegment.probes.parse_probes(text)
    except uad.UADError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


LOG_PROMPTS_HELP = (
    "for reproduction: score the prompts the authors' logs hold, DIR = one attack's folder of "
    "their exp/log/benchmark (UAD, AA; files N_ATTACK.json for sa_N), with --annotations"
)
FASTSAM_RGB_HELP = (
    "for reproduction: give FastSAM RGB, as the paper's code did (ultralytics reads BGR)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = unsegment.cli.Parser(  # every usage error is one line
        prog="eval.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--clean", type=Path, metavar="PATH", help="clean image file or folder")
    add("--adv", type=Path, metavar="PATH", help="adversarial image file or folder (same names)")
    add("--models", required=True, metavar="LIST", help="NAME or NAME=CHECKPOINT, comma-separated")
    add("--annotations", type=Path, metavar="DIR", help="SA-1B JSON folder (or one JSON file)")
    count, at_least_1, threshold = number(int, 0), number(int, 1), number(float, 0.0, 1.0)
    for flag, kind, default, what in [
        ("--points", count, 5, "point prompts per object"),
        ("--boxes", count, 3, "box prompts per object"),
        ("--max-masks", at_least_1, 10, "objects per image"),
        ("--seed", count, 0, "prompt seed, >= 0"),
        ("--points-per-side", at_least_1, 32, "clean-reference generator grid"),
        ("--pred-iou-thresh", threshold, 0.88, "clean-reference, in [0, 1]"),
        ("--stability-score-thresh", threshold, 0.95, "clean-reference, in [0, 1]"),
        ("--report-objects", at_least_1, 3, "objects per model in each --report picture"),
        (
            "--max-pixels",
            at_least_1,
            unsegment.images.MAX_PIXELS,
            "refuse larger images, against decompression bombs",
        ),
    ]:
        metavar = "N" if type(default) is int else "T"
        add(flag, type=kind, default=default, metavar=metavar, help=f"{what} (%(default)s)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (%(default)s)")
    add("--out", type=Path, metavar="FILE", help="write the results as JSON")
    add("--csv", type=Path, metavar="FILE", help="write per-image and summary rows as CSV")
    probes = (
        "purification probes, comma-separated, each scored on the protected and the clean image: "
        "none, jpeg:Q (1..100), resize:S (downscale, (0, 1]), blur:SIGMA (pixels), median:N (odd "
        "window), noise:STD (1/255, seeded), bits:N (1..8), or steps joined by +, e.g. "
        "jpeg:75+resize:0.5 (none)"
    )
    add("--probes", type=probe_list, metavar="LIST", help=probes)
    add("--jpeg", type=number(int, 1, 100), metavar="Q", help="--probes jpeg:Q, 1..100")
    probe = "--probes resize:S, downscale in (0, 1]; with --jpeg: --probes resize:S+jpeg:Q"
    add("--resize", type=number(float, 0.0, 1.0, above=True), metavar="S", help=probe)
    add("--report", type=Path, metavar="DIR", help="write DIR/index.html and a picture per image")
    bench = "time each model (random weights) on a WxH image (%dx%d) and exit" % BENCH_SIZE
    add("--bench", nargs="?", type=image_size, const=BENCH_SIZE, metavar="WxH", help=bench)
    add("--log-prompts", type=Path, metavar="DIR", help=LOG_PROMPTS_HELP)
    add("--fastsam-rgb", action="store_true", help=FASTSAM_RGB_HELP)
    add("--quiet", action="store_true", help="no progress or warning lines")
    add(
        "--records",
        type=Path,
        metavar="DIR",
        help="keep each image's scores in DIR/NAME.json; a rerun scores only the rest",
    )
    add(
        "--shard",
        type=distributed.shard,
        metavar="K/N",
        help="score clean images K, K+N, ... into --records only; the same command without "
        "--shard then writes the summary (torchrun needs none: docs/scale.md)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """What argparse's declarations cannot say: flags that go together."""
    if args.points + args.boxes == 0:
        parser.error("--points and --boxes are both 0: nothing to score")
    if args.bench is None and (args.clean is None or args.adv is None):
        parser.error("--clean and --adv are required (unless --bench)")
    shorthand = [f"{k}:{v}" for k, v in (("resize", args.resize), ("jpeg", args.jpeg)) if v]
    if shorthand and args.probes is not None:
        parser.error("--jpeg and --resize are shorthands for one --probes item; use --probes alone")
    if args.probes is None:
        args.probes = [unsegment.probes.probe_name("+".join(shorthand) or "none")]
    if args.log_prompts is not None and args.annotations is None:
        parser.error("--log-prompts needs --annotations: its prompts are of their objects")


def check_inputs(args, take=list) -> Tuple[List[Pair], List[str]]:
    """Everything about the images, annotations and outputs that can be known before any model
    loads: every image decoded, every annotation file read and checked against its image's size.
    Returns the pairs to score and an error line per image that cannot be; raises UADError for a
    problem that stops the run."""
    outputs = [p for p in (args.out, args.csv) if p is not None]
    for path in outputs:
        unsegment.images.check_writable(path)
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise uad.UADError(f"{args.out}: --out and --csv name the same file")
    if args.annotations is not None and not args.annotations.exists():
        raise uad.UADError(f"{args.annotations}: no such annotation folder or file")
    if args.log_prompts is not None and not args.log_prompts.is_dir():
        raise uad.UADError(f"{args.log_prompts}: no such folder of the authors' logs")
    if args.shard is not None and args.records is None:
        raise uad.UADError(
            "--shard needs --records DIR: where the run without --shard finds its scores"
        )
    if args.records is not None:
        unsegment.images.check_writable(args.records / "record.json", new_folder=True)
    pairs, failures = pair_inputs(args.clean, args.adv, args.max_pixels, take)
    if args.annotations is not None and args.annotations.is_file() and len(pairs) > 1:
        raise uad.UADError(f"{args.annotations}: one annotation file for {len(pairs)} images")
    if args.annotations is not None:
        folder = args.annotations.is_dir()
        for pair in list(pairs):
            pair.annotations = (
                args.annotations / f"{pair.clean.stem}.json" if folder else args.annotations
            )
            try:  # read whole, as scoring will: a corrupt file or a wrong size is found now
                objects = read_annotations(pair.annotations, pair.size, args.max_masks)
                image_prompts(objects, pair.clean.stem, args)  # --log-prompts: its log, checked
            except uad.UADError as e:
                failures.append(f"{e} (for {pair.clean})")
                pairs.remove(pair)
    folders = args.clean.is_dir()
    images = image_files(args.clean) + image_files(args.adv) if folders else [args.clean, args.adv]
    inputs = {p.resolve() for p in images + [pair.annotations for pair in pairs] if p}
    for path in outputs:
        if path.resolve() in inputs:
            raise uad.UADError(f"{path}: is one of the inputs; write the results elsewhere")
    if args.report is not None:
        inputs = [p for p in (args.clean, args.adv, args.annotations) if p is not None]
        folders = [p if p.is_dir() else p.parent for p in inputs]
        unsegment.report.check_report_folder(args.report, folders)
    return pairs, failures


def run(args) -> int:
    specs = parse_models(args.models)
    share = distributed.share_of(args.shard)
    device = unsegment.models.resolve_device(distributed.device_name(share, args.device))
    if args.bench is not None:
        return run_benchmark(args, specs, device)
    pairs, failures = check_inputs(args, share.take)
    progress = unsegment.progress.Progress(args.quiet)
    for message in failures:
        progress.error(message)
    folders = args.clean.is_dir()
    if not pairs and not share.split:  # a share of a split run may hold none
        if folders:
            progress.error(f"no image pair left to score in {args.clean}")
        return 1
    check_models(specs)
    distributed.start(share, device)

    keys = {id(p): record_key(p, args, specs) for p in pairs} if args.records else {}
    recorded = {id(p): record_of(p, args, keys) for p in pairs}
    if args.report is not None:  # a recorded pair is scored again for a picture it lacks
        recorded = {
            k: r if r and (args.report / unsegment.report.picture_name(r.name)).is_file() else None
            for k, r in recorded.items()
        }
    todo = [p for p in pairs if recorded[id(p)] is None]
    try:  # none when every pair is recorded
        segmenters = [
            load_segmenter(n, path, device, args.quiet, args.fastsam_rgb)
            for n, path in specs
            if todo
        ]
    except (torch.OutOfMemoryError, MemoryError):
        raise uad.UADError(f"out of memory on {device} loading {args.models}") from None
    predictors = [(s.new_predictor(), s.new_predictor()) for s in segmenters]
    rows = [recorded[id(p)] for p in pairs if recorded[id(p)] is not None]
    for i, pair in enumerate(todo):
        progress.item(i, len(todo), pair.clean.name)
        try:
            rows.append(score_pair(pair, segmenters, predictors, args, progress))
            if args.records is not None:
                value = to_json(rows[-1], annotated=True)
                distributed.write_record(record_path(pair, args), keys[id(pair)], value)
        except uad.UADError as e:
            progress.error(str(e))
            failures.append(str(e))
        except (torch.OutOfMemoryError, MemoryError):
            failures.append(f"{pair.clean}: out of memory on {device}; try a smaller image")
            progress.error(failures[-1])
    progress.end()
    # every rank's rows, in the order of the clean files as one process has them, and failures
    # sorted, so that the files are the same however the work was split
    ranks = share.collect((rows, failures))
    share.close()
    if not share.main:
        return 0  # rank 0 counts this rank's failures
    rows = sorted((r for rank in ranks for r in rank[0]), key=lambda r: Path(r.clean))
    failures = sorted(f for rank in ranks for f in rank[1])
    if share.shard[1] > 1:
        print(
            f"shard {share.shard[0]}/{share.shard[1]}: {len(rows)} image(s) scored into "
            f"{args.records}, {len(failures)} failed; once every shard is done, the same "
            "command without --shard writes the summary"
        )
        return 1 if failures else 0
    if not rows:
        if folders:
            progress.error(f"none of the {len(pairs)} image pair(s) could be scored")
        return 1

    annotated = args.annotations is not None
    names = [name for name, _ in specs]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    # pictures do not change the results, nor how the work was split
    for flag in ("report", "report_objects", "shard", "records"):
        del settings[flag]
    settings["models"] = dict(specs)
    results = Results(
        mode="annotations" if annotated else "clean-reference",
        settings=settings,
        summary=summarise_rows(rows, names, annotated),
        quality=summarise_quality(rows),
        seconds_per_image={
            k: float(np.mean([r.seconds[k] for r in rows])) for k in rows[0].seconds
        },
        images=rows,
        failures=failures,
        probes=summarise_probes(rows, names, args.probes),
    )
    how = "" if annotated else f" (objects from {names[0]}'s automatic masks)"
    counts = f"{len(rows)} image(s) scored, {len(failures)} failed"
    print(f"mode: {results.mode}{how}; {counts}; seed {args.seed}")
    print(format_table(results))
    if args.probes != ["none"]:
        print(format_probe_table(results))
    texts = {}  # both files are formatted before either is written
    if args.out is not None:
        texts[args.out] = json.dumps(to_json(results, annotated), indent=1, allow_nan=False) + "\n"
    if args.csv is not None:
        texts[args.csv] = format_csv(results)
    for path, text in texts.items():
        write_text(path, text)
    if args.report is not None:
        unsegment.report.write_page(args.report, to_json(results, annotated))
    if failures and folders:
        progress.error(f"{len(failures)} image(s) not scored, see above")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        return run(args)
    except uad.UADError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # nothing is half-written: results files are renamed into place
        print("interrupted", file=sys.stderr)
        sys.exit(130)
