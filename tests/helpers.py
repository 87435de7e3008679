"""Helpers shared by the tests (fixtures are in conftest.py): tiny random-init SAM models, small
real photos, SA-1B-style annotations and eval.py's printed table, and benchmark scripts loaded as
modules.

A real ViT-B takes about 14 s per forward pass at 1024 on two cores; these take a fraction of a
second. Tests save them as .pth checkpoints and load them through unsegment.models.load_sam, the
code path real checkpoints take, with unsegment.models.SAM_ARCHS patched to the tiny shapes (see
conftest.py).
"""

import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import eval as ev
import unsegment.models

ROOT = Path(__file__).resolve().parent.parent  # the repository
EXAMPLES = ROOT / "examples"

# The same keys as unsegment.models.SAM_ARCHS, so every code path that names a model type works
# unchanged.
TINY_ARCHS = {
    "vit_b": dict(embed_dim=64, depth=8, num_heads=2, global_attn_indexes=()),
    "vit_l": dict(embed_dim=96, depth=8, num_heads=2, global_attn_indexes=()),
    "vit_h": dict(embed_dim=128, depth=8, num_heads=4, global_attn_indexes=()),
}


def build_tiny_sam(model_type: str, seed: int = 0):
    """A random-init SAM with a tiny encoder; positional tables randomised too (not zeros)."""
    torch.manual_seed(seed)
    sam = unsegment.models.build_sam(model_type, TINY_ARCHS[model_type])
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.02)
    return sam


def small_photo(size=(96, 64)) -> np.ndarray:
    """A real photo reduced to `size` (w, h), uint8 (h, w, 3): fast to attack in tests."""
    with Image.open(EXAMPLES / "chelsea.png") as im:
        return np.array(im.convert("RGB").resize(size, Image.BILINEAR))


def load_script(path: str):
    """The repository's script at `path` (e.g. "benchmarks/reproduce.py") imported as a module
    named after its file: benchmarks/ holds scripts, not a package, so nothing goes on sys.path."""
    file = ROOT / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses and pickle look a class's module up
    spec.loader.exec_module(module)
    return module


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )


def png_16bit(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG of (H, W) grey or (H, W, 3) RGB values 0..65535, written by hand: Pillow
    writes 16-bit grey, but no 16-bit RGB."""
    h, w = values.shape[:2]
    rows = values.astype(">u2").reshape(h, -1)  # big-endian samples, row after row
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if values.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )
    return path


def deep_inputs(folder: Path) -> dict:
    """Inputs whose values are finer than 8 bits, built from chelsea: {name: (path, its values
    at full precision in [0, 1], float64)}. A dark 16-bit grey PNG (every value <= 255, which a
    guess from the maximum read as 8-bit), a 16-bit RGB PNG with random low bytes, and a float
    (mode F) TIFF off the 8-bit lattice."""
    photo = small_photo()
    dark = photo[..., 1].astype(np.uint16)
    rng = np.random.default_rng(0)
    rgb16 = photo.astype(np.uint16) * 256 + rng.integers(0, 256, photo.shape, dtype=np.uint16)
    floats = ((photo[..., 1] + 0.37) / 256).astype(np.float32)
    Image.fromarray(dark).save(folder / "dark16.png")
    Image.fromarray(floats).save(folder / "float.tif")
    return {
        "dark16": (folder / "dark16.png", dark / 65535),
        "rgb16": (png_16bit(folder / "rgb16.png", rgb16), rgb16 / 65535),
        "float": (folder / "float.tif", floats.astype(np.float64)),
    }


def full_precision(path: Path) -> np.ndarray:
    """An image file's values in [0, 1] at the depth it stores them (8-bit, 16-bit, float)."""
    with Image.open(path) as im:
        a = np.asarray(im)
        mode = im.mode
    scale = 1.0 if mode == "F" else 65535.0 if mode.startswith("I") else 255.0
    return a.astype(np.float64) / scale


# -----------------------------------------------------------------------------------------------
# For eval.py and the scripts around it: a COCO RLE encoder (the inverse of what eval.py decodes),
# SA-1B-style annotation files, images, and eval.py's printed table read back


def encode_runs(mask: np.ndarray) -> list:
    """Run lengths of an (H, W) bool mask in column-major order, starting with background."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0] + runs if flat.size and flat[0] else runs


def encode_string(runs: list) -> str:
    """COCO's compressed counts string, written from the description of pycocotools' rleToString."""
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative numbers end at -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + (0x20 if more else 0) + 48))
    return "".join(out)


def annotation(mask: np.ndarray, compressed: bool = True) -> dict:
    runs = encode_runs(mask)
    bbox = list(ev.mask_bbox(mask)) if mask.any() else [0, 0, 0, 0]
    counts = encode_string(runs) if compressed else runs
    return {"segmentation": {"size": list(mask.shape), "counts": counts}, "bbox": bbox}


def write_annotations(path: Path, masks, compressed=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    anns = [annotation(m, compressed) for m in masks]
    path.write_text(json.dumps({"image": {"file_name": path.stem}, "annotations": anns}))
    return path


def two_objects(h=64, w=96):
    """A rectangle and an L shape, the kind of masks SA-1B annotates."""
    rect = np.zeros((h, w), bool)
    rect[10:40, 20:60] = True
    ell = np.zeros((h, w), bool)
    ell[30:60, 65:75] = True
    ell[50:60, 65:90] = True
    return rect, ell


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def noisy(pixels: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, std, pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def parse_table(stdout: str) -> dict:
    """{(model, prompts): [count, mIoU, ASR@50, ASR@10, ...]} from the printed table."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model"))
    table = {}
    for line in lines[head + 1 :]:
        cells = line.split()
        if len(cells) < 6 or cells[1] not in ("point", "box", "all"):
            break
        table[(cells[0], cells[1])] = [float(c) for c in cells[2:]]
    return table


# SAM 3 at 112 x 112 (8 x 8 patches of 14) with an 8-block ViT of width 32, global attention in
# blocks 3 and 7 and 4 x 4 windows (its real shape: 1008, 32 blocks of width 1024, 7, 15, 23, 31,
# 24 x 24); the necks and heads keep theirs
TINY_SAM3_SIZE = 112
TINY_SAM3_VIT = dict(embed_dim=32, depth=8, num_heads=2, global_att_blocks=(3, 7), window_size=4)


def shrink_sam3(mp) -> None:
    """Makes sam3's own build_tracker (unsegment.models' SAM 3 builder) build TINY_SAM3_VIT at
    TINY_SAM3_SIZE, through monkeypatch `mp`."""
    import sam3.model_builder as builder
    from sam3.model.vitdet import ViT

    real_tracker = builder.Sam3TrackerPredictor

    def tiny_vit(compile_mode=None):  # _create_vit_backbone's other settings
        settings = dict(
            img_size=TINY_SAM3_SIZE, pretrain_img_size=56, patch_size=14, mlp_ratio=4.625,
            qkv_bias=True, use_abs_pos=True, tile_abs_pos=True, rel_pos_blocks=(), use_rope=True,
            use_interp_rope=True, pretrain_use_cls_token=True, retain_cls_token=False,
            ln_pre=True, ln_post=False, bias_patch_embed=False, drop_path_rate=0.1,
        )  # fmt: skip
        return ViT(**settings, **TINY_SAM3_VIT)

    mp.setattr(builder, "_create_vit_backbone", tiny_vit)
    mp.setattr(
        builder,
        "Sam3TrackerPredictor",
        lambda **kw: real_tracker(**{**kw, "image_size": TINY_SAM3_SIZE}),
    )


def write_authors_log(folder: Path, number: int, attack: str, masks, seed: int = 0) -> list:
    """The authors' result log of image sa_`number` and `attack`, as their benchmark writes it
    (exp/benchmark.py: utils.py's OutputLogger into folder/N_ATTACK.json): each mask's 5 points
    drawn as their sample_pixel_in_mask draws them and 3 boxes jittered as attack/eval.py does,
    with made-up IoUs per model. Returns the prompts, [(mask index, coordinates)], in order."""
    rng = np.random.RandomState(seed)
    prompts, evaluations = [], {}
    for i, mask in enumerate(masks):
        inside = np.flip(np.argwhere(mask), axis=1)  # (x, y)
        drawn = [p.tolist() for p in inside[rng.choice(len(inside), 5, replace=False)]]
        x, y, w, h = ev.mask_bbox(mask)
        cx, cy = x + w / 2, y + h / 2
        for _ in range(3):
            bw, bh = rng.randint(int(0.9 * w), int(1.1 * w)), rng.randint(
                int(0.9 * h), int(1.1 * h)
            )
            drawn.append(
                [
                    max(int(cx - bw / 2), 0),
                    max(int(cy - bh / 2), 0),
                    min(int(cx + bw / 2), mask.shape[1] - 1),
                    min(int(cy + bh / 2), mask.shape[0] - 1),
                ]
            )
        for j, coords in enumerate(drawn):
            scores = {m: float(rng.uniform(0, 100)) for m in ("fastsam", "samb", "saml", "samh")}
            evaluations[f"m{i}_p{j}"] = {"prompt": coords, **scores}
            prompts.append((i, coords))
    folder.mkdir(parents=True, exist_ok=True)
    record = {"imgid": number, "adv_method": attack, "evaluations": evaluations}
    (folder / f"{number}_{attack}.json").write_text(json.dumps(record, indent=4))
    return prompts
