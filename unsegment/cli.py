"""uad.py's command line: protect an image file, or a folder of them.

    python uad.py IN OUT --eps 8        (or: unsegment IN OUT --eps 8)

The flags of the attack are generated from uad.UADConfig's fields, in the CLI's units (1/255
for eps, alpha and encoder-noise); everything that can be checked before a model loads is
checked first, and every problem is one line on stderr and a non-zero exit.
"""

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

import uad
import warp_kernel
from uad import (
    PRESET_ALIASES,
    PRESETS,
    UADConfig,
    UADError,
    preset_config,
    quantize,
    to_pixels,
    to_tensor,
)
from unsegment.images import (
    LOSSY_FORMATS,
    MAX_PIXELS,
    MODE_NAMES,
    check_destination,
    check_writable,
    in_layout_of,
    mode_levels,
    on_lattice,
    output_format,
    output_mode,
    psnr,
    read_image,
    write_atomically,
    write_image,
)
from unsegment import cost, distributed, models
from unsegment.progress import Progress
from unsegment.report import preview


@dataclass
class Job:
    src: Path
    dst: Path
    new_folder: bool = False  # dst's folder is the output folder, created on the first write
    fmt: str = ""  # PIL format of dst, from check_job
    mode: str = ""  # the mode dst is written in (L, LA, RGB, RGBA, I;16, F), from check_job
    frames: int = 1  # frames or pages of src, from check_job
    shape: tuple = ()  # (height, width, 2 if grey else 3): src's pixels, from check_job
    eps: float = 0.0  # the attack's budget: --eps, less what rounding onto dst's lattice takes
    note: str = ""  # a warning on how src's depth is written, from check_job
    preview: Optional[Path] = None  # --preview: where its picture goes, from check_previews


def jobs_for(src: Path, out) -> Tuple[List[Job], Optional[str]]:
    """The jobs: one file, or every image file of a folder into another folder (made if new);
    and for a folder, a line saying which of its entries are skipped (hidden files, such as
    macOS's ._a.png and .DS_Store, subfolders, other files), or None. `out` is OUT as typed: a
    trailing slash names a folder, created on the first write like folder mode's output."""
    dst, into_folder = Path(out), str(out).endswith(("/", os.sep))
    if into_folder and dst.exists() and not dst.is_dir():
        raise UADError(f"{out}: ends in '/', so it names a folder, but {dst} is a file")
    if not src.is_dir():
        if dst.is_dir() or into_folder:
            return [Job(src, dst / src.name, new_folder=not dst.is_dir())], None
        return [Job(src, dst)], None
    exts = Image.registered_extensions()
    files, skipped = [], {"hidden": 0, "folder": 0, "other": 0}
    for p in sorted(src.iterdir()):
        if p.name.startswith("."):
            skipped["hidden"] += 1
        elif p.is_dir():
            skipped["folder"] += 1
        elif not p.is_file() or p.suffix.lower() not in exts:
            skipped["other"] += 1
        else:
            files.append(p)
    why = [
        f"{skipped['hidden']} hidden (name starting with '.')" * (skipped["hidden"] > 0),
        f"{skipped['folder']} folder(s), not searched" * (skipped["folder"] > 0),
        f"{skipped['other']} not image file(s)" * (skipped["other"] > 0),
    ]
    note = None
    if sum(skipped.values()):
        note = f"{src}: skipping {sum(skipped.values())} entries: " + ", ".join(filter(None, why))
    if not files:
        raise UADError(f"{src}: no image files in this folder" + (f" ({note})" if note else ""))
    if dst.exists() and not dst.is_dir():
        raise UADError(f"{dst}: input is a folder, so the output must be a folder too")
    if not dst.exists() and dst.suffix.lower() in exts and not into_folder:
        raise UADError(f"{dst}: input is a folder, so the output must be a folder, not a file name")
    return [Job(p, dst / p.name, new_folder=True) for p in files], note


def check_job(
    job: Job, overwrite: bool, max_pixels: Optional[int], eps: float = UADConfig.eps, lossy=False
) -> None:
    """Everything about one job that can be known before the model loads: the input decodes,
    the output is not the input, its folder is writable, its format holds the result (lossy
    only with --lossy) and the budget `eps` leaves room for the perturbation."""
    if job.dst.resolve() == job.src.resolve() and not overwrite:
        raise UADError(f"{job.dst}: output is the input file; pass --overwrite to replace it")
    picture = read_image(job.src, max_pixels, keep_depth=True)
    job.fmt = check_destination(job.dst, overwrite, None, job.new_folder)
    job.mode = output_mode(job.dst, job.fmt, picture.mode)
    if job.fmt in LOSSY_FORMATS and not lossy:
        raise UADError(
            f"{job.dst}: {job.fmt} is lossy, so the saved file would not be within eps of the "
            "input; save as .png, or pass --lossy to write it anyway"
        )
    job.frames = picture.frames
    job.shape = (*picture.pixels.shape[:2], picture.pixels.ndim)
    job.eps, job.note = budget(job, picture, eps)


def check_previews(jobs: List[Job], path: Path, folder_mode: bool, overwrite: bool) -> None:
    """--preview: one PNG file for one image, or a folder (made if missing) of one PNG per image
    named after its output; each writable, new unless --overwrite, and none of the inputs or
    outputs. Sets each job's preview."""
    if folder_mode and path.exists() and not path.is_dir():
        raise UADError(f"{path}: --preview of a folder names a folder, and this is a file")
    for job in jobs:
        job.preview = path / f"{job.dst.stem}.png" if folder_mode else path
        if job.preview.suffix.lower() != ".png":
            raise UADError(f"{job.preview}: --preview writes PNG; name it .png")
        if job.preview.resolve() in (job.src.resolve(), job.dst.resolve()):
            raise UADError(f"{job.preview}: --preview would replace an input or output image")
        if job.preview.exists() and not overwrite:
            raise UADError(f"{job.preview}: exists; pass --overwrite to replace it")
        check_writable(job.preview, new_folder=folder_mode)


def done_before(job: Job, max_pixels: Optional[int], eps: float) -> bool:
    """--resume: whether job.dst holds a complete protected copy of job.src, to be kept: it
    decodes whole, has src's size and alpha, and is within eps of src's own values and not
    equal to them (a lossy format: decodes, with src's size). False where there is no dst;
    UADError naming dst where there is one of another kind."""
    if not job.dst.exists() or job.dst.is_dir():
        return False
    picture = read_image(job.src, max_pixels, keep_depth=True)
    keep = "--resume keeps only complete outputs; pass --overwrite to replace it"
    try:
        saved = in_layout_of(read_image(job.dst, None, keep_depth=True), picture)
    except UADError as e:
        raise UADError(f"{e}; {keep}") from None
    problem = None
    if saved.pixels.shape[:2] != picture.pixels.shape[:2]:
        (h, w), (H, W) = saved.pixels.shape[:2], picture.pixels.shape[:2]
        problem = f"is {w}x{h}, its input {job.src} {W}x{H}"
    elif output_format(job.dst) in LOSSY_FORMATS:
        return True
    elif saved.pixels.shape != picture.pixels.shape:
        problem = f"has other channels than its input {job.src}"
    elif (saved.alpha is None) != (picture.alpha is None) or (
        saved.alpha is not None and not np.array_equal(saved.alpha, picture.alpha)
    ):
        problem = f"has another alpha channel than its input {job.src}"
    else:
        d = pixel_distance(saved.pixels, picture.pixels) + (1 / 257 if picture.high_bytes else 0)
        if d == 0:
            problem = f"is its input {job.src} unchanged"
        elif d > eps + 1e-12:
            problem = f"is {d * 255:.4g}/255 from its input {job.src}, over the budget"
    if problem:
        raise UADError(f"{job.dst}: exists and {problem}; {keep}")
    return True


def budget(job: Job, picture, eps: float) -> tuple:
    """(the attack's eps, a warning or ""): the whole of eps when dst holds src's values as they
    are; one level of dst's lattice less where they are rounded onto it (16-bit or float grey
    written 8-bit, float written 16-bit) or where PIL kept only their high bytes (16-bit RGB),
    both under one level, so that the file stays within eps of src's own values. UADError
    where that leaves no level."""
    levels = mode_levels(job.mode)
    if levels == picture.levels and not picture.high_bytes:
        return eps, ""
    unit = "grey level" if levels == 255 else "16-bit level"
    if picture.high_bytes:
        where, cure = job.src, "pass --eps 2 or more"
        why = "PIL reads only the high bytes of this 16-bit file, so it is written 8-bit"
    else:
        where, cure = job.dst, "save as .tif or .png, or pass --eps 2 or more"
        depth = "16-bit" if levels == 65535 else "8-bit"
        why = f"{job.fmt} holds no {MODE_NAMES[picture.mode]}, so it is written {depth}"
    if math.floor(eps * levels + 1e-6) < 2:
        raise UADError(
            f"{where}: {why}, and the rounding takes one {unit} of the budget, leaving none of "
            f"--eps {eps * 255:g}; {cure}"
        )
    return eps - 1 / levels, (
        f"{where}: {why}, within eps of the input's own values (one {unit} of the budget "
        "covers the rounding)"
    )


def check_surrogates(args, config: UADConfig) -> List[tuple]:
    """The surrogates to load, [(name, checkpoint or None), ...], from --surrogate or else
    --model-type and --checkpoint; their packages, checkpoint files and the blocks forming f
    (--layers, --stage-layers) checked against each one's depth, before any model loads."""
    if args.surrogate is not None and (args.model_type or args.checkpoint):
        raise UADError(
            "--surrogate replaces --model-type and --checkpoint: name each checkpoint as "
            "--surrogate NAME=PATH"
        )
    specs = args.surrogate or [(args.model_type or "vit_b", args.checkpoint)]
    for name, checkpoint in specs:
        models.import_family(name)
        models.check_model_checkpoint(name, checkpoint)  # SAM 3's: the cache's, if none
        uad.check_layers(name, config, *models.encoder_depth(name, checkpoint), cli=True)
        getattr(uad, models.MODELS[name].info.surrogate).check_settings(name, config, cli=True)
    return specs


def check_model(args, config: UADConfig, device: torch.device) -> List[tuple]:
    """What can be known about the surrogates, the attack's inputs and the backends before
    anything loads; returns the surrogates to load (see check_surrogates)."""
    specs = check_surrogates(args, config)
    if (config.method == "aa") != (args.target_image is not None):
        raise UADError("--preset aa needs --target-image PATH, and only it takes one")
    if args.target_image is not None:
        read_image(args.target_image, args.max_pixels)
    if config.impl in ("cpp", "cuda"):
        wanted = "cpu" if config.impl == "cpp" else "cuda"
        if device.type != wanted:
            raise UADError(f"--impl {config.impl} runs on {wanted.upper()}, the device is {device}")
        if not warp_kernel.backends()[config.impl]:
            raise UADError(f"--impl {config.impl}: the warp_kernel extension is unavailable")
    return specs


def batches_of(jobs: List[Job], size: int) -> List[List[Job]]:
    """The jobs in batches of at most `size` images of one shape (Job.shape) and budget
    (Job.eps), in the order of their first job."""
    groups = {}
    for job in jobs:
        groups.setdefault((job.shape, job.eps), []).append(job)
    batches = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
    order = {id(job): i for i, job in enumerate(jobs)}
    return sorted(batches, key=lambda batch: order[id(batch[0])])


def protect_files(jobs: List[Job], surrogates, config: UADConfig, args, progress: Progress) -> list:
    """Protects files of one shape and budget as one batch: one attack on all of them, each image
    drawing from its own generator, so that every file is what protecting it alone gives.
    Returns each job's summary line, or the UADError that stopped it."""
    results, pictures = [None] * len(jobs), {}
    for i, job in enumerate(jobs):
        try:
            picture = read_image(job.src, args.max_pixels, keep_depth=True)
            if (*picture.pixels.shape[:2], picture.pixels.ndim) != job.shape:
                raise UADError(f"{job.src}: changed since it was checked")
            pictures[i] = picture
        except UADError as e:
            results[i] = e
    for i in pictures:
        job = jobs[i]
        if job.frames > 1:
            progress.warn(f"{job.src}: only the first of its {job.frames} frames is protected")
        if job.note:
            progress.warn(job.note)
    if not pictures:
        return results
    device = surrogates[0].device
    # each image on the lattice it is written on: the attack's reference
    x = torch.cat([to_tensor(reference(p, jobs[i].mode), device) for i, p in pictures.items()])
    eps = jobs[next(iter(pictures))].eps  # one per batch (batches_of)
    run = config if eps == config.eps else dataclasses.replace(config, eps=eps)
    target = None
    if args.target_image is not None:
        target = to_tensor(read_image(args.target_image, args.max_pixels).pixels, device)
    adv, _, stats = uad.attack(x, surrogates, run, progress, target)
    progress.end()
    seconds = f"{stats.seconds:.1f} s" + (f" for a batch of {len(x)}" if len(x) > 1 else "")
    for b, (i, picture) in enumerate(pictures.items()):
        job, levels = jobs[i], mode_levels(jobs[i].mode)
        pixels = to_pixels(quantize(adv[b : b + 1], x[b : b + 1], eps, levels), levels)
        try:
            within_budget(job, picture, pixels, config.eps)
            saved_picture = write_image(
                job.dst,
                dataclasses.replace(picture, pixels=pixels, high_bytes=False),
                args.overwrite,
                job.new_folder,
                warn=progress.warn,
            )
        except UADError as e:
            results[i] = e
            continue
        # measure the file as saved against the input's own values
        saved, image = to_tensor(saved_picture.pixels, device), to_tensor(picture.pixels, device)
        with torch.no_grad():
            f = lambda v: [s.features(v, config) for s in surrogates]  # noqa: E731
            distance = uad.feature_distance(f(saved), f(image)).clamp_min(0).item()
        ssim = warp_kernel.ssim(saved.expand(-1, 3, -1, -1), image.expand(-1, 3, -1, -1)).item()
        linf = linf_text(job, picture, saved_picture.pixels, config.eps)
        if job.preview is not None:
            job.preview.parent.mkdir(parents=True, exist_ok=True)
            as_array = lambda t: t[0].permute(1, 2, 0).cpu().numpy()  # noqa: E731
            write_atomically(job.preview, preview(as_array(image), as_array(saved), config.eps))
        results[i] = (
            f"{job.dst}: L-inf {linf}, PSNR {psnr(saved, image):.2f} dB, SSIM {ssim:.4f}, "
            f"feature distance {distance:.4f}, {seconds} ({args.preset} preset, "
            f"{surrogate_names(surrogates)})"
        )
    return results


def reference(picture, mode: str):
    """The picture's pixels on the lattice `mode` is written on (as they are if already)."""
    levels = mode_levels(mode)
    return picture.pixels if levels == picture.levels else on_lattice(picture.pixels, levels)


def pixel_distance(a, b) -> float:
    """max |a - b| of two pixel arrays, each in [0, 1] on its own lattice, in float64."""
    scale = lambda p: p.astype(np.float64) / (uad.LEVELS.get(p.dtype) or 1)  # noqa: E731
    return float(np.abs(scale(a) - scale(b)).max())


def within_budget(job: Job, picture, pixels, eps: float) -> None:
    """UADError unless `pixels` (to be written) are within eps of the input's own values: a
    check of the arithmetic above, before anything is written. PIL's high bytes of a 16-bit
    file are within 1/257 of its values. A lossy format (--lossy) is measured after writing."""
    if job.fmt in LOSSY_FORMATS:
        return
    d = pixel_distance(pixels, picture.pixels) + (1 / 257 if picture.high_bytes else 0)
    if d > eps + 1e-12:
        raise UADError(
            f"{job.dst}: the protected pixels are {d * 255:.4g}/255 from the input, over the "
            f"{eps * 255:g}/255 budget; nothing written"
        )


def linf_text(job: Job, picture, saved, eps: float) -> str:
    """The summary's L-infinity distance of the saved pixels from the input's, in 1/255, with
    what it is measured on: "8/255", "8/255 (16-bit)", "6.498/255 (16-bit written 8-bit)", "38/255
    (over the 8/255 budget: JPEG is lossy)"."""
    d = pixel_distance(saved, picture.pixels) * 255
    text = f"{d:.0f}/255" if abs(d - round(d)) < 1e-9 else f"{d:.3f}/255"
    eps255 = f"{eps * 255:g}/255"
    if job.fmt in LOSSY_FORMATS and d > eps * 255 + 1e-9:
        return f"{text} (over the {eps255} budget: {job.fmt} is lossy)"
    if picture.high_bytes:
        # 8-bit from 8-bit: a whole number of levels; the file's values are under one more away
        return f"{text} from PIL's 8-bit reading, under {d + 1:.0f}/255 from the 16-bit file"
    if picture.levels == 255:
        return text
    depth = {65535: "16-bit", None: "float"}[picture.levels]
    written = {"I;16": "16-bit", "F": "float"}.get(job.mode, "8-bit")
    return text + (f" ({written})" if depth == written else f" ({depth} written {written})")


def surrogate_names(surrogates) -> str:
    """How lines name the surrogates: "surrogate vit_b", "surrogates vit_b + sam2.1_t"."""
    return f"surrogate{'s' * (len(surrogates) > 1)} " + " + ".join(s.name for s in surrogates)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other input error
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def block_list(text: str) -> tuple:
    """--layers: comma-separated 0-based block indices."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated block indices, e.g. 3,4,5,6"
        ) from None


def not_a_surrogate(name: str) -> Optional[str]:
    """Why model `name` is no surrogate, for the models of the families without one."""
    if name == "hq_vit_tiny":
        return (
            f"{name}: Light HQ-SAM's encoder is a TinyViT of MobileSAM's architecture, whose "
            "surrogate is mobile_sam"
        )
    if name.startswith("hq_") and name in models.MODELS:
        return f"{name}: SAM-HQ keeps SAM's image encoder frozen, so its surrogate is {name[3:]}"
    if name == "fastsam":
        return (
            "fastsam: FastSAM is a YOLOv8 segmentation network with no SAM image encoder to "
            "attack; it is an evaluation target (eval.py --models fastsam)"
        )
    return None


def surrogate_list(text: str) -> List[tuple]:
    """--surrogate: NAME[=CHECKPOINT][,NAME[=CHECKPOINT]...] -> [(name, Path or None), ...]."""
    known = models.surrogate_models()
    names = [item.strip().partition("=")[0] for item in text.split(",") if item.strip()]
    first_unknown = next((name for name in names if name not in known), None)
    if first_unknown is not None and not_a_surrogate(first_unknown):
        raise argparse.ArgumentTypeError(not_a_surrogate(first_unknown))
    try:
        specs = models.model_list(text, known, "surrogate")
    except UADError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return [(name, Path(path) if path else None) for name, path in specs]


def surrogate_names_help() -> str:
    """The --surrogate names by family: "vit_b, vit_l, vit_h (SAM); mobile_sam (MobileSAM); ..."."""
    families = {}
    for name in models.surrogate_models():
        families.setdefault(models.MODELS[name].info.title, []).append(name)
    return "; ".join(f"{', '.join(names)} ({title})" for title, names in families.items())


def positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def model_type(text: str) -> str:
    if text not in models.SAM_ARCHS:
        raise argparse.ArgumentTypeError(
            f"unknown model type {text!r}; choose from {', '.join(models.SAM_ARCHS)}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="uad.py", description="Protect images against Segment Anything with UAD.")
    p.add_argument("input", type=Path, help="image file, or a folder of images")
    p.add_argument(
        "output",  # as typed: a trailing slash names a folder (Path would drop it)
        help="output file (format from its extension), or folder (an existing one, or a name "
        "ending in /)",
    )
    p.add_argument(
        "--preset",
        default="paper",
        choices=[*PRESETS, *PRESET_ALIASES],
        help="paper (default): the live fidelity term, 242 encoder passes per image; "
        "no-fidelity: L_F and the proxy loop off, 42 passes; reference: old name of no-fidelity; "
        "baselines: aa (towards --target-image's features), noise (uniform noise)",
    )
    p.add_argument(
        "--model-type",
        default=None,
        type=model_type,
        metavar="{" + ",".join(models.SAM_ARCHS) + "}",
        help="surrogate SAM v1 (default vit_b)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="SAM weights (.pth); default: the official file in $UNSEGMENT_CACHE "
        "(~/.cache/unsegment), downloaded on first use",
    )
    p.add_argument(
        "--surrogate",
        type=surrogate_list,
        default=None,
        metavar="NAME[=PATH],..",
        help="the surrogate(s), instead of --model-type and --checkpoint; several form an "
        f"ensemble whose feature distances both stages average. NAME: {surrogate_names_help()}. "
        "SAM-HQ needs none of its own: it keeps SAM's encoder frozen, so vit_b/l/h attack it "
        "(hq_vit_tiny's is a TinyViT, as mobile_sam's). PATH: its checkpoint; without it, the "
        "official file in the cache, downloaded on first use",
    )
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help=f"refuse larger images, against decompression bombs [{MAX_PIXELS}]",
    )
    p.add_argument(
        "--target-image",
        type=Path,
        metavar="PATH",
        help="the other image whose features the aa baseline pulls towards (--preset aa only)",
    )
    p.add_argument("--quiet", action="store_true", help="no header, progress or warning lines")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--preview",
        type=Path,
        metavar="PATH",
        help="also write the original, the protected image and |protected - original| (eps is "
        "white) side by side as PNG: PATH a .png file, or for a folder a folder of one per image",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="folder mode: keep the outputs an earlier run wrote (checked: complete, within eps "
        "of their input) and protect the rest",
    )
    p.add_argument(
        "--shard",
        type=distributed.shard,
        metavar="K/N",
        help="folder mode: protect images K, K+N, K+2N, ... of the sorted folder, for launchers "
        "that start no process group (torchrun needs none: docs/scale.md)",
    )
    p.add_argument(
        "--lossy",
        action="store_true",
        help="allow a lossy output format (JPEG); the file is then not within eps of the input, "
        "and its summary line says how far it is",
    )
    p.add_argument(
        "--batch",
        type=positive_count,
        default=1,
        metavar="N",
        help="folder mode: attack up to N images of one size at once, each exactly as if alone "
        "(faster on a GPU) [1]",
    )
    group = p.add_argument_group("attack settings (defaults are the paper preset's)")
    for f in dataclasses.fields(UADConfig):
        flag = "--" + f.name.replace("_", "-")
        aliases = ["--input-noise"] if f.name == "encoder_noise" else []  # its old name
        unit, default, choices = f.metadata["unit"], f.default, f.metadata["choices"]
        sep = "," if f.name == "eps" else ""
        if f.name == "eps":
            shown = f"{EPS_RANGE[0]} to {EPS_RANGE[1]} in 1/255 [{default * unit:g}]"
        elif unit == 255:
            shown = f"in 1/255 [{default * unit:g}]"
        else:
            shown = f"[{','.join(map(str, default)) if isinstance(default, tuple) else default}]"
        helptext = f"{f.metadata['help']}" + ("" if f.type is bool else f"{sep} {shown}")
        if f.type is bool:
            group.add_argument(flag, action="store_true", default=None, help=helptext)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=block_list, default=None, metavar="I,J,..", help=helptext)
        else:
            metavar = None if choices else "N" if type(default) is int else "X"
            group.add_argument(
                flag,
                *aliases,
                type=type(default),
                default=None,
                choices=choices,
                metavar=metavar,
                help=helptext,
            )
    return p


# --eps in 1/255: at least one grey level, at most UADConfig's cap
EPS_RANGE = (1, round(UADConfig.__dataclass_fields__["eps"].metadata["at_most"] * 255))


def config_from_args(args) -> UADConfig:
    if args.max_pixels < 1:
        raise UADError(f"--max-pixels {args.max_pixels}: must be positive")
    return config_from_flags(
        args.preset, {f.name: getattr(args, f.name) for f in dataclasses.fields(UADConfig)}
    )


def config_from_flags(preset: str, flags: dict) -> UADConfig:
    """The config of `preset` with attack flags {field: value in the flag's unit, None: the
    preset's}; every error names the flag and gives its value in the flag's unit."""
    units = {f.name: f.metadata["unit"] for f in dataclasses.fields(UADConfig)}
    overrides = {
        name: value / units[name] if units[name] != 1 else value
        for name, value in flags.items()
        if value is not None
    }
    eps255 = overrides.get("eps", UADConfig.eps) * 255
    if not 0 < eps255 <= EPS_RANGE[1]:
        raise UADError(f"--eps {eps255:g}: must be in (0, {EPS_RANGE[1]}] (units of 1/255)")
    if eps255 < EPS_RANGE[0]:
        raise UADError(
            f"--eps {eps255:g}: below one grey level; --eps counts 1/255ths "
            f"(--eps 8 is 8/255 = {8 / 255:.4f})"
        )
    try:
        config = preset_config(preset, **overrides)
    except UADError as e:  # name the flag, and its value in the flag's unit
        name, _, rest = str(e).partition(" ")
        if units.get(name) == 255 and name in overrides:
            rest = f"{overrides[name] * 255:g}/255" + rest[rest.index(":") :]
        raise UADError(f"--{name.replace('_', '-')} {rest}") from None
    check_reach(config)
    return config


def check_reach(config: UADConfig) -> None:
    """UADError when stage 2 could not change a single grey level, so that the file saved would
    be the input: its PGD steps are what perturb the image (uad and aa), and together they move
    a pixel at most steps x alpha from where it starts (the image, or with --random-start
    uniform noise)."""
    if config.method == "noise" or config.random_start:
        return
    if config.steps == 0:
        raise UADError(
            "--steps 0: stage 2's PGD steps are what change the image; with none the file "
            "would be the input unchanged (--preset noise draws uniform noise alone)"
        )
    reach = config.steps * config.alpha * 255
    if reach < 0.5:
        raise UADError(
            f"--alpha {config.alpha * 255:g}/255: {config.steps} steps of it move a pixel at "
            f"most {reach:.2g}/255, under half a grey level, so the file would be the input "
            "unchanged (--alpha counts 1/255ths)"
        )


def steps_in_words(config: UADConfig) -> str:
    """What the attack does, for the header: "40 deformation + 40 PGD steps", "40 PGD steps",
    "uniform noise, no steps"."""
    if config.method == "noise":
        return "uniform noise, no steps"
    if config.method == "aa":
        return f"{config.steps} PGD steps"  # towards the target image's features (header)
    return f"{config.deform_steps} deformation + {config.steps} PGD steps"


def header(args, config: UADConfig, device: torch.device, jobs: List[Job], surrogates) -> str:
    """The line announcing the work, with what to expect on a CPU."""
    preset = PRESET_ALIASES.get(args.preset, args.preset)
    text = (
        f"unsegment: preset {args.preset}, eps {config.eps * 255:g}/255 ({config.eps:.4f}), "
        f"{steps_in_words(config)}, "
        f"{surrogate_names(surrogates)} on {device}, seed {config.seed}, {len(jobs)} image(s)"
        + (f" in batches of up to {args.batch}" if args.batch > 1 and len(jobs) > 1 else "")
        + (f", the encoder sees {config.robust}" if config.robust else "")
        + (f", towards the features of {args.target_image}" if args.target_image else "")
    )
    if device.type == "cpu":
        gflops = sum(cost.forward_gflops(s, config) for s in surrogates)
        threads = torch.get_num_threads()
        minutes = cost.cpu_estimate(config, gflops, threads) / 60
        forwards, backwards = uad.encoder_passes(config)
        each = f" through each of the {len(surrogates)} surrogates" if len(surrogates) > 1 else ""
        native = cost.native_bfloat16()
        emulated = (
            ", bfloat16 priced as float32: this CPU has no native bfloat16 (AVX512-BF16 or AMX)"
            if config.dtype == "bfloat16" and not native
            else ""
        )
        text += (
            f"\nunsegment: on a CPU expect about {minutes:.0f} min per image ({forwards} encoder "
            f"forwards, {backwards} backwards{each}, priced at the speed measured on "
            f"{cost.CPU_PASS_MACHINE}{emulated}; this CPU, {cost.cpu_model()}, may differ)"
        )
        if preset == "paper":
            fast = cost.cpu_estimate(
                preset_config("no-fidelity", dtype=config.dtype), gflops, threads
            )
            text += f"; --preset no-fidelity takes about {fast / 60:.0f} min, a CUDA GPU seconds"
        else:
            text += "; a CUDA GPU takes seconds"
        if config.dtype == "float32" and native:
            bf16 = dataclasses.replace(config, dtype="bfloat16")
            text += (
                f"; this CPU multiplies bfloat16 natively: --dtype bfloat16 takes about "
                f"{cost.cpu_estimate(bf16, gflops, threads) / 60:.0f} min"
            )
    return text


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (already printed as one line), or --help
        return e.code
    progress = Progress(quiet=args.quiet)
    share, failures, unchecked, resumed, jobs = None, 0, 0, 0, []
    try:
        share = distributed.share_of(args.shard)
        progress.tag = share.tag()
        config = config_from_args(args)
        device = models.resolve_device(distributed.device_name(share, args.device))
        specs = check_model(args, config, device)
        all_jobs, skipped = jobs_for(args.input, args.output)
        if skipped and share.main:
            progress.warn(skipped)
        if len(all_jobs) == 1 and not share.split:  # fails before any model is loaded
            if resumable(all_jobs[0], args, config.eps):
                resumed = kept(all_jobs[0])
            else:
                check_job(all_jobs[0], args.overwrite, args.max_pixels, config.eps, args.lossy)
                jobs = all_jobs
    except UADError as e:  # the same on every process: said once
        if share is None or share.main:
            progress.error(str(e))
        return 1
    if not jobs and not resumed:
        for job in share.take(all_jobs):  # this process's share, each checked on its own
            try:
                if resumable(job, args, config.eps):
                    resumed += kept(job)
                    continue
                check_job(job, args.overwrite, args.max_pixels, config.eps, args.lossy)
                jobs.append(job)
            except UADError as e:
                progress.error(str(e))
                failures += 1
    unchecked = failures
    try:
        if not (jobs or resumed or share.split):
            raise UADError(f"{args.input}: none of its {failures} image(s) can be protected")
        if args.preview is not None:
            check_previews(jobs, args.preview, args.input.is_dir(), args.overwrite)
        distributed.start(share, device)
        surrogates = [
            uad.Surrogate.of(models.load_model(name, checkpoint, device, quiet=args.quiet), name)
            for name, checkpoint in (specs if jobs else [])
        ]
    except UADError as e:
        progress.error(str(e))
        return 1
    if not args.quiet and share.main and surrogates:
        text = header(args, config, device, all_jobs, surrogates)
        if share.split:
            n = share.shard[1] * share.world
            text += f"\nunsegment: {n} shares, image i of the sorted folder in share i mod {n}"
        print(text, file=sys.stderr)
    order = {id(job): i for i, job in enumerate(jobs)}
    done, shown, lines = 0, 0, {}  # lines are printed in the jobs' order
    for batch in batches_of(jobs, args.batch):
        progress.item(done, len(jobs), ", ".join(job.src.name for job in batch), len(batch))
        try:
            results = protect_files(batch, surrogates, config, args, progress)
        except UADError as e:
            results = [e] * len(batch)
        except (torch.OutOfMemoryError, MemoryError):
            hint = "a smaller --batch" if len(batch) > 1 else "a smaller image"
            results = [
                UADError(f"{job.src}: out of memory on {device}; try {hint}") for job in batch
            ]
        progress.end()
        done += len(batch)
        lines.update((order[id(job)], result) for job, result in zip(batch, results))
        while shown in lines:
            result = lines.pop(shown)
            if isinstance(result, UADError):
                failures += 1
                progress.error(str(result))
            else:
                print(result, flush=True)
            shown += 1
    # the counts of every process, summed, in one line (under torchrun, rank 0's)
    total, failures, resumed = share.total([len(jobs) + unchecked + resumed, failures, resumed])
    if share.main and (total > 1 or share.split):
        k, n = share.shard
        print(
            f"shard {k}/{n}: " * (n > 1)
            + f"{total - failures} protected, {failures} failed"
            + f" ({resumed} of them kept from an earlier run)" * bool(resumed)
        )
    share.close()
    return 1 if failures and share.main else 0  # under torchrun, rank 0 says it for all


def resumable(job: Job, args, eps: float) -> bool:
    """--resume: whether job.dst is kept (done_before); with --overwrite as well, a dst that is
    not a complete output is protected again instead of being an error."""
    if not args.resume:
        return False
    try:
        return done_before(job, args.max_pixels, eps)
    except UADError:
        if args.overwrite:
            return False
        raise


def kept(job: Job) -> int:
    """--resume: the line of an output kept from an earlier run; 1, to count it."""
    print(f"{job.dst}: kept, protected by an earlier run (--resume)", flush=True)
    return 1


def run(argv=None) -> int:
    """main, with Ctrl-C as one line and exit status 130 (the console script and uad.py)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
