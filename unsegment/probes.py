"""Purification probes: what eval.py --probes does to an image before scoring it, in memory.

A probe is `none` or steps joined by `+`, run left to right:

    jpeg:Q      JPEG at quality Q, 1..100 (PIL, libjpeg-turbo, 4:2:0)
    resize:S    downscale by S in (0, 1] (PIL bicubic, antialiased)
    blur:S      Gaussian blur of std S pixels, S in (0, 20] (PIL's GaussianBlur)
    median:N    median filter over N x N pixels, N odd in 3..15 (PIL's MedianFilter)
    noise:S     Gaussian noise of std S in 1/255, S in (0, 64], rounded and clipped to uint8
    bits:N      N bits per channel, 1..8: each value to the nearest of 2^N levels (feature
                squeezing, Xu et al. 2018)

The result is scaled back to the original size (bicubic) when a step changed it, so prompts and
reference masks keep the original resolution. Noise is drawn from --seed and the image's name,
the same for the clean and the protected image of a pair: every probe is reproducible.
"""

import functools
import hashlib
import io
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageFilter

from uad import UADError

# kind: (whole number, lowest allowed, lowest is allowed, highest, unit for messages)
KINDS = {
    "jpeg": (True, 1, True, 100, "quality"),
    "resize": (False, 0.0, False, 1.0, "downscale factor"),
    "blur": (False, 0.0, False, 20.0, "sigma in pixels"),
    "median": (True, 3, True, 15, "odd window size in pixels"),
    "noise": (False, 0.0, False, 64.0, "std in 1/255"),
    "bits": (True, 1, True, 8, "bits per channel"),
}


@functools.lru_cache(maxsize=None)
def parse_probe(text: str) -> Tuple[Tuple[str, float], ...]:
    """One probe, "resize:0.5+jpeg:75" -> (("resize", 0.5), ("jpeg", 75)); "none" -> ().
    UADError naming the probe and the problem."""
    if text.strip() == "none":
        return ()
    steps = []
    for step in text.split("+"):
        kind, _, value = step.strip().partition(":")
        if kind not in KINDS or not value:
            raise UADError(
                f"probe {text!r}: {step.strip()!r} is not none, "
                + ", ".join(f"{k}:{'N' if KINDS[k][0] else 'S'}" for k in KINDS)
            )
        whole, low, low_ok, high, unit = KINDS[kind]
        try:
            number = int(value) if whole else float(value)
        except ValueError:
            what = "a whole number" if whole else "a number"
            raise UADError(f"probe {text!r}: {kind} takes {what} ({unit}), not {value!r}") from None
        fits = (low <= number if low_ok else low < number) and number <= high
        if not fits or (kind == "median" and number % 2 == 0):
            where = f"{low}..{high}" if low_ok else f"({low:g}, {high:g}]"
            odd = "odd, " if kind == "median" else ""
            raise UADError(f"probe {text!r}: {kind} takes {odd}{where} ({unit}), not {value}")
        steps.append((kind, number))
    return tuple(steps)


def probe_name(text: str) -> str:
    """The probe as the outputs name it: its steps with their values as parsed ("jpeg:75")."""
    steps = parse_probe(text)
    return "+".join(f"{kind}:{value:g}" for kind, value in steps) if steps else "none"


def parse_probes(text: str) -> List[str]:
    """--probes: comma-separated probes -> their names, in order; UADError if one is bad or
    repeated."""
    names = [probe_name(item) for item in text.split(",") if item.strip()]
    if not names:
        raise UADError(f"--probes {text!r}: no probe")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise UADError(f"--probes {text!r}: {repeated} is listed twice")
    return names


def noise_generator(seed: int, key: str, step: int) -> np.random.Generator:
    """The noise of step `step` of a probe on the image named `key` (the clean file's stem)."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest, step])


def apply_probe(pixels: np.ndarray, probe: str, seed: int = 0, key: str = "") -> np.ndarray:
    """A probe applied to an image, in memory.

    Args:
      pixels: (H, W, 3) uint8 RGB.
      probe: a probe's text (see parse_probe).
      seed, key: where noise is drawn from (--seed and the clean file's stem).

    Returns:
      (H, W, 3) uint8 at the original size; `pixels` itself for the probe none.
    """
    steps = parse_probe(probe)
    if not steps:
        return pixels
    im = Image.fromarray(pixels)
    size = im.size
    for i, (kind, value) in enumerate(steps):
        if kind == "resize":
            small = (max(1, round(im.width * value)), max(1, round(im.height * value)))
            im = im.resize(small, Image.BICUBIC)
        elif kind == "jpeg":
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=value)
            im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        elif kind == "blur":
            im = im.filter(ImageFilter.GaussianBlur(value))  # PIL's radius is the std
        elif kind == "median":
            im = im.filter(ImageFilter.MedianFilter(value))
        elif kind == "noise":
            a = np.asarray(im, dtype=np.float64)
            a = a + noise_generator(seed, key, i).normal(0.0, value, a.shape)
            im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
        elif kind == "bits":
            levels = 2**value - 1
            a = np.rint(np.asarray(im, dtype=np.float64) * levels / 255)
            im = Image.fromarray(np.rint(a * 255 / levels).astype(np.uint8))
    if im.size != size:
        im = im.resize(size, Image.BICUBIC)
    return np.asarray(im)
