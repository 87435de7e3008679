"""Pictures of a protection: eval.py --report DIR (an HTML page and a PNG per image) and uad.py
--preview PATH (original, protected, perturbation side by side).

Drawn with PIL alone, with its built-in bitmap font: the same inputs give the same bytes. A
model's mask is filled half-transparently in its object's colour with a solid outline, the
reference is outlined in white, the prompt is marked (a dot for a point, a rectangle for a box).
Panels of an image over MAX_SIDE pixels are scaled down (masks by nearest neighbour).
"""

import html
import io
from pathlib import Path
from typing import Callable, List, Optional, Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uad import UADError
from unsegment.images import check_writable, write_atomically

MAX_SIDE = 512  # longest side of a panel in pixels; larger images are scaled down
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]  # fmt: skip
REFERENCE = (255, 255, 255)  # outline of the reference mask
FONT = ImageFont.load_default_imagefont()  # PIL's built-in bitmap font: the same on every machine
LINE = 13  # pixels per line of text
GAP = 6  # pixels between panels


def boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of an (H, W) bool mask with a 4-neighbour outside it (or on the image edge)."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def overlay(pixels: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """A mask over an image: (H, W, 3) uint8 with the mask's pixels half `colour` (rounded up),
    its outline solid `colour`, every other pixel as it was."""
    out = pixels.copy()
    c = np.asarray(colour, dtype=np.uint16)
    out[mask] = ((pixels[mask].astype(np.uint16) + c + 1) // 2).astype(np.uint8)
    out[boundary(mask)] = colour
    return out


def fit(pixels: np.ndarray, masks: Sequence[Optional[np.ndarray]]):
    """The image and masks scaled so that the longest side is at most MAX_SIDE, and the scale."""
    h, w = pixels.shape[:2]
    scale = min(1.0, MAX_SIDE / max(h, w))
    if scale == 1.0:
        return pixels, list(masks), 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))
    shrink = lambda m: np.asarray(Image.fromarray(m).resize(size, Image.NEAREST))  # noqa: E731
    return small, [None if m is None else shrink(m) for m in masks], scale


def panel(
    pixels: np.ndarray,
    mask: Optional[np.ndarray],
    colour,
    prompt=None,
    reference: Optional[np.ndarray] = None,
    caption: str = "",
) -> Image.Image:
    """One picture of a prediction: the image (H, W, 3) uint8 with the (H, W) bool mask drawn
    over it (None: the model gave none), the reference outlined, the prompt marked (an object
    with .kind "point" | "box" and .coords in pixels, or None), and a caption line below."""
    pixels, (mask, reference), scale = fit(pixels, [mask, reference])
    out = pixels if mask is None else overlay(pixels, mask, colour)
    if reference is not None:
        out = out.copy()
        out[boundary(reference)] = REFERENCE
    im = Image.fromarray(out)
    if prompt is not None:
        draw, xy = ImageDraw.Draw(im), [round(v * scale) for v in prompt.coords]
        if prompt.kind == "point":
            x, y = xy
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour, outline=(0, 0, 0))
        else:
            draw.rectangle(xy, outline=(0, 0, 0), width=1)
            draw.rectangle([xy[0] + 1, xy[1] + 1, xy[2] - 1, xy[3] - 1], outline=colour)
    return captioned(im, caption)


def captioned(im: Image.Image, caption: str) -> Image.Image:
    """The image with a line of text below it, as wide as the wider of the two."""
    width = max(im.width, int(FONT.getlength(caption)) + 4)
    out = Image.new("RGB", (width, im.height + LINE + 2), (255, 255, 255))
    out.paste(im, (0, 0))
    ImageDraw.Draw(out).text((2, im.height + 2), caption, fill=(0, 0, 0), font=FONT)
    return out


def perturbation(clean: np.ndarray, protected: np.ndarray, scale: float) -> np.ndarray:
    """|protected - clean| made visible: (H, W, C) in [0, 1] each (C = 1 or 3), scaled so that
    `scale` (in [0, 1] units) is white; (H, W, 3) uint8."""
    diff = np.abs(protected.astype(np.float64) - clean.astype(np.float64)) / max(scale, 1e-12)
    diff = np.rint(np.clip(diff, 0, 1) * 255).astype(np.uint8)
    return np.repeat(diff, 3, axis=2) if diff.shape[2] == 1 else diff


def perturbation_caption(scale: float, what: str) -> str:
    return f"|protected - clean| x {1 / scale:.3g}: white = {scale * 255:.3g}/255 ({what})"


def stack(rows: List[List[Image.Image]], titles: Sequence[str]) -> Image.Image:
    """Rows of panels under their title lines, on white: one picture."""
    width = max(max(sum(p.width for p in row) + GAP * (len(row) - 1), 0) for row in rows)
    width = max([width] + [int(FONT.getlength(t)) + 4 for t in titles])
    height = sum(LINE + max(p.height for p in row) + GAP for row in rows)
    out = Image.new("RGB", (width + 2 * GAP, height + GAP), (255, 255, 255))
    draw, y = ImageDraw.Draw(out), GAP
    for title, row in zip(titles, rows):
        draw.text((GAP, y), title, fill=(0, 0, 0), font=FONT)
        y, x = y + LINE, GAP
        for p in row:
            out.paste(p, (x, y))
            x += p.width + GAP
        y += max(p.height for p in row) + GAP
    return out


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # no time or text chunks: the same pixels give the same bytes
    return buf.getvalue()


# -----------------------------------------------------------------------------------------------
# uad.py --preview


def rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) values in [0, 1] -> (H, W, C') with C' = 1 (grey) or 3 (colour)."""
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return pixels[..., :1] if pixels.shape[2] < 3 else pixels[..., :3]  # alpha left out


def preview(original: np.ndarray, protected: np.ndarray, eps: float) -> bytes:
    """PNG bytes of the original, the protected image and |protected - original| scaled so that
    eps is white, side by side. original, protected: (H, W) or (H, W, C) float in [0, 1]."""
    original, protected = rgb(original), rgb(protected)
    show = lambda a: np.repeat(np.rint(a * 255).astype(np.uint8), 3 // a.shape[2], 2)  # noqa
    panels = [
        captioned(Image.fromarray(fit(show(original), [])[0]), "original"),
        captioned(Image.fromarray(fit(show(protected), [])[0]), "protected"),
        captioned(
            Image.fromarray(fit(perturbation(original, protected, eps), [])[0]),
            perturbation_caption(eps, "eps"),
        ),
    ]
    return png_bytes(stack([panels], [""]))


# -----------------------------------------------------------------------------------------------
# eval.py --report


def pick_prompts(prompts, objects: int) -> list:
    """The prompts a picture shows: the first point and the first box of each of the first
    `objects` objects."""
    picked = {}
    for p in prompts:
        if p.object < objects:
            picked.setdefault((p.object, p.kind), p)
    return [picked[k] for k in sorted(picked, key=lambda k: (k[0], k[1] != "point"))]


class Picture:
    """The picture of one scored pair: the clean image, the protected one as scored, the
    perturbation, then for each model a row per object with its point and box prompt on both."""

    def __init__(self, name: str, clean, unprobed, scored, probe: str, annotated: bool):
        self.clean, self.scored = clean, scored
        linf = int(np.abs(unprobed.astype(int) - clean.astype(int)).max())
        scale = max(linf, 1) / 255
        probe_note = "" if probe == "none" else f" through {probe}"
        self.rows = [
            [
                captioned(Image.fromarray(fit(clean, [])[0]), "clean"),
                captioned(Image.fromarray(fit(scored, [])[0]), "protected" + probe_note),
                captioned(
                    Image.fromarray(fit(perturbation(clean / 255, unprobed / 255, scale), [])[0]),
                    perturbation_caption(scale, "the pair's L-inf"),
                ),
            ]
        ]
        reference = "annotation" if annotated else "the model's mask on the clean image"
        self.titles = [
            f"{name}: filled = the model's mask for the prompt, white outline = the reference "
            f"({reference})"
        ]
        self.annotated = annotated

    def add_model(self, model: str, prompts, objects, predict_clean, predict_scored, iou):
        """A row per object for `model`: prompts from pick_prompts; objects: the annotated
        objects (with .mask) or None (clean-reference mode: the reference is the clean
        prediction); predict_*: prompt -> (H, W) bool mask or None; iou: (mask, ref) -> %."""
        by_object = {}
        for p in prompts:
            clean = predict_clean(p)
            ref = objects[p.object].mask if objects is not None else clean
            scored = predict_scored(p)
            colour = PALETTE[p.object % len(PALETTE)]
            by_object.setdefault(p.object, []).append(
                (
                    panel(self.clean, clean, colour, p, ref, f"clean, {p.kind}: IoU {iou(clean, ref):.1f}"),
                    panel(self.scored, scored, colour, p, ref, f"protected, {p.kind}: IoU {iou(scored, ref):.1f}"),
                )
            )  # fmt: skip
        for obj, pairs in by_object.items():
            self.rows.append([c for c, _ in pairs] + [s for _, s in pairs])
            self.titles.append(f"{model}, object {obj}")

    def png(self) -> bytes:
        return png_bytes(stack(self.rows, self.titles))


def picture_name(image_name: str) -> str:
    """Where the picture of an image goes, relative to the report's folder."""
    return f"images/{image_name}.png"


def check_report_folder(folder: Path, inputs: Sequence[Path]) -> None:
    """UADError unless `folder` can hold the report: a folder (made if missing, its parent
    existing) that is none of the inputs' folders."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UADError(f"{folder}: --report names a folder, and this is a file")
    if not folder.exists() and not folder.parent.is_dir():
        raise UADError(f"{folder}: its parent folder {folder.parent} does not exist")
    if folder.resolve() in {Path(p).resolve() for p in inputs}:
        raise UADError(f"{folder}: is one of the inputs; write the report elsewhere")
    check_writable(folder / "index.html", new_folder=True)


def write_picture(folder: Path, image_name: str, picture: Picture) -> None:
    path = Path(folder) / picture_name(image_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, picture.png())


def number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: List[List[str]], head: List[str], id: str) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{c}</{tag}>" for c in row)  # noqa: E731
    body = "\n".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f'<table id="{id}">\n<tr>{cells("th", head)}</tr>\n{body}\n</table>'


def page(results: dict, pictures: Callable[[str], bool]) -> str:
    """index.html of a run: results is eval.py's JSON (as a dict); pictures(name) says whether
    image `name` has a picture."""
    e = html.escape
    annotated = results["mode"] == "annotations"
    head = ["probe", "model", "prompts", "count", "mIoU", "ASR@50", "ASR@10"]
    head += ["clean mIoU"] * annotated + ["probed clean mIoU", "probed clean ASR@50"]
    head += ["L-inf max", "PSNR mean", "SSIM mean"]
    rows = []
    for probe, scores in results["probes"].items():
        q = scores["quality"]
        for model, kinds in scores["adv"].items():
            for kind, m in kinds.items():
                clean = scores["clean"][model][kind]
                row = [e(probe), e(model), kind, str(m["count"])]
                row += [number(m[k]) for k in ("miou", "asr50", "asr10")]
                if annotated:
                    row.append(number(results["summary"][model][kind]["clean_miou"]))
                row += [number(clean["miou"]), number(clean["asr50"])]
                row += [str(q["linf_max"]), number(q["psnr_mean"]), number(q["ssim_mean"], 4)]
                rows.append(row)
    models = list(results["summary"])
    image_head = ["image", "reference", "objects", "L-inf", "PSNR", "SSIM"]
    image_head += [f"{m} mIoU" for m in models] + ["picture"]
    image_rows = []
    for r in results["images"]:
        link = picture_name(r["name"])
        shown = f'<a href="{e(quote(link))}">{e(r["name"])}</a>' if pictures(r["name"]) else "-"
        row = [e(r["name"]), e(r["reference"]), str(r["objects"]), str(r["linf"])]
        row += [number(r["psnr"]), number(r["ssim"], 4)]
        row += [number(r["metrics"][m]["all"]["miou"]) for m in models] + [shown]
        image_rows.append(row)
    first = next(iter(results["probes"]))
    mode = (
        "annotation mode: references are the annotated masks"
        if annotated
        else "clean-reference mode: each model's reference is its own mask on the clean image"
    )
    failures = "".join(f"<li>{e(f)}</li>" for f in results["failures"])
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>eval.py report</title>',
            "<style>body{font-family:sans-serif} table{border-collapse:collapse}"
            " td,th{border:1px solid #999;padding:2px 6px;text-align:right}</style>",
            "</head><body>",
            "<h1>eval.py report</h1>",
            f"<p>{e(mode)}; {len(results['images'])} image(s) scored, "
            f"{len(results['failures'])} failed; prompt seed {results['settings']['seed']}. "
            "mIoU and ASR in percent (lower mIoU: stronger protection); probed clean: the clean "
            "image through the same probe, against the same references.</p>",
            "<h2>Summary</h2>",
            table(rows, head, "summary"),
            f"<h2>Images</h2><p>Quality and mIoU of the protected image as scored by the first "
            f"probe ({e(first)}); each picture shows it.</p>",
            table(image_rows, image_head, "images"),
            f"<h2>Failures</h2><ul>{failures}</ul>" if failures else "",
            "</body></html>",
            "",
        ]
    )


def write_page(folder: Path, results: dict) -> None:
    """DIR/index.html, linking the pictures that exist in DIR/images."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    text = page(results, lambda name: (folder / picture_name(name)).is_file())
    write_atomically(folder / "index.html", text.encode("utf-8", errors="surrogateescape"))
