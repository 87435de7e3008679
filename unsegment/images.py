"""Image files: reading any format PIL reads, writing exactly and atomically.

read_image decodes a file into a Picture (8-bit RGB or grey pixels, or with keep_depth 16-bit and
float grey at full precision; alpha and ICC profile carried through); write_image saves one
through a temporary file that is re-read and checked before it is renamed into place, so a file
is written whole, holding exactly the pixels given, or not at all. A mode states its range
(8 bits 0..255, 16 bits 0..65535, float 0..1): it is never guessed from the values. Every problem
is one uad.UADError line naming the file.
"""

import dataclasses
from dataclasses import dataclass
import io
import math
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from uad import LEVELS, MIN_SIZE, UADError, uint8_pixels


@dataclass
class Picture:
    """A decoded image: the pixels we attack and what we carry through untouched."""

    # (H, W, 3) RGB or (H, W) grey, uint8; or (H, W) uint16 (16-bit grey) or float32 in [0, 1]
    # (float grey); the dtype is the lattice (uad.LEVELS: 255, 65535, None for float)
    pixels: np.ndarray
    alpha: Optional[np.ndarray] = None  # (H, W) uint8, or None
    icc_profile: Optional[bytes] = None  # the input's colour profile, when it fits the pixels
    frames: int = 1  # frames or pages of the file; only the first is read
    # 8-bit pixels that PIL took from a 16-bit file's high bytes (16-bit RGB, RGBA, LA): the
    # file's values v / 65535 are within 1/257 (under one grey level) of pixels / 255
    high_bytes: bool = False

    @property
    def levels(self) -> Optional[int]:
        """The lattice of the pixels: 255 (uint8), 65535 (16-bit grey), None (float grey)."""
        return LEVELS.get(self.pixels.dtype)

    @property
    def mode(self) -> str:
        """L, LA, RGB or RGBA; I;16 (16-bit grey) or F (float grey)."""
        if self.pixels.dtype != np.uint8:
            return "I;16" if self.pixels.dtype == np.uint16 else "F"
        return ("L" if self.pixels.ndim == 2 else "RGB") + ("A" if self.alpha is not None else "")

    def to_pil(self, pixels: Optional[np.ndarray] = None) -> Image.Image:
        p = self.pixels if pixels is None else pixels
        channels = p if self.alpha is None else np.dstack([p, self.alpha])
        # PIL names 16-bit and float grey from the dtype itself (I;16, F)
        im = Image.fromarray(channels, self.mode) if p.dtype == np.uint8 else Image.fromarray(p)
        if self.icc_profile:
            im.info["icc_profile"] = self.icc_profile
        return im


GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def matching_profile(profile: Optional[bytes], mode: str) -> Optional[bytes]:
    """The ICC profile if its colour space (header bytes 16-19) is that of our pixels, else None
    (a CMYK file's profile does not describe the RGB we convert it to)."""
    if not profile or len(profile) < 20:
        return None
    space = profile[16:20]
    return profile if space == (b"GRAY" if mode.startswith("L") else b"RGB ") else None


def deep_pixels(im: Image.Image) -> np.ndarray:
    """The pixels of a 16-bit or float grey PIL image at full precision: uint16 for the I modes
    (I;16*, and I as PIL decodes 16-bit PNG, TIFF and PGM files: 0..65535 whatever the values),
    float32 for F (0..1). UADError for values outside that range or not finite."""
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all():
            raise UADError("float image holds NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise UADError(
                f"float image values run from {a.min():.4g} to {a.max():.4g}, not within [0, 1]"
            )
        return a
    a = np.asarray(im).astype(np.int64)
    if a.min() < 0 or a.max() > 65535:
        raise UADError(
            f"{im.mode} image values run from {a.min()} to {a.max()}, outside the 16-bit range "
            "0..65535 it is read in"
        )
    return a.astype(np.uint16)


def on_lattice(pixels: np.ndarray, levels: int) -> np.ndarray:
    """Pixels (uint8, uint16 or float32 in [0, 1]) rounded onto the lattice of `levels`
    (255: uint8, 65535: uint16), each value to the nearest level; as they are if already on it."""
    if LEVELS.get(pixels.dtype) == levels:
        return pixels
    values = pixels.astype(np.float64) / (LEVELS.get(pixels.dtype) or 1)
    return np.round(values * levels).astype(np.uint8 if levels == 255 else np.uint16)


def to_picture(image) -> Picture:
    """A uint8 array or PIL image as a Picture: RGB or grey pixels plus optional alpha, 16-bit
    and float grey at full precision (UADError if their values are out of their mode's range)."""
    if isinstance(image, Image.Image):
        im = ImageOps.exif_transpose(image)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        alpha = np.asarray(im.getchannel("A")) if im.mode in ALPHA_MODES else None
        if im.mode.startswith("I") or im.mode == "F":
            pixels = deep_pixels(im)
        else:
            pixels = np.asarray(im.convert("L" if im.mode in GREY_MODES else "RGB"))
        profile = matching_profile(
            image.info.get("icc_profile"), "L" if pixels.ndim == 2 else "RGB"
        )
        return Picture(np.ascontiguousarray(pixels), alpha, profile)
    return Picture(uint8_pixels(image))


# PIL's own limit against decompression bombs (about 9459 x 9459): beyond it, --max-pixels
MAX_PIXELS = 89_478_485


def high_bytes_of(im: Image.Image) -> bool:
    """Whether PIL decodes `im` (opened, not yet loaded) from 16-bit samples to an 8-bit mode,
    keeping each value's high byte: a 16-bit RGB, RGBA or LA PNG, a 48-bit TIFF or PPM."""
    if im.mode.startswith("I") or im.mode == "F":
        return False
    for tile in im.tile:
        args = tile[3]
        rawmode = args if isinstance(args, str) else args[0] if args else ""
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def not_regular(path: Path) -> Optional[str]:
    """What `path` is when it exists but is no regular file (a FIFO, a device, a socket)."""
    mode = path.stat().st_mode
    for test, what in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a file"


def read_image(path, max_pixels: Optional[int] = MAX_PIXELS, keep_depth: bool = False) -> Picture:
    """Reads an image file into RGB or grey pixels plus an optional alpha channel.

    EXIF orientation is applied; palette, CMYK and other colour modes become RGB; an RGB or grey
    ICC profile is kept. 16-bit grey (0..65535) and float grey (F, 0..1; other values are a
    UADError) are rounded to 8 bits, or with keep_depth kept as uint16 / float32. PIL decodes
    16-bit RGB to its high bytes (Picture.high_bytes). Only the first frame of an animation or
    multi-page file is read (Picture.frames counts them). An image of more than max_pixels
    pixels (None: no limit) is refused from its header, before decoding. Any problem raises
    UADError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise UADError(f"{path}: is a folder, expected an image file")
    if not path.exists():
        raise UADError(f"{path}: no such file")
    what = not_regular(path)
    if what is not None:
        raise UADError(f"{path}: not a regular file ({what}); expected an image file")
    if path.stat().st_size == 0:
        raise UADError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            # our own limit below replaces PIL's decompression-bomb warning and error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
        with im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise UADError(
                    f"{path}: image is {w}x{h} ({w * h / 1e6:.0f} Mpx), over the limit of "
                    f"{max_pixels} pixels against decompression bombs; pass --max-pixels "
                    f"{w * h} to process it"
                )
            frames = getattr(im, "n_frames", 1)
            high_bytes = high_bytes_of(im)  # from the tiles, which load() empties
            im.load()
            try:
                picture = to_picture(im)  # applies the EXIF orientation, keeps a fitting profile
            except UADError as e:  # values outside their mode's range
                raise UADError(f"{path}: {e}") from None
    except Image.UnidentifiedImageError:
        raise UADError(f"{path}: not an image file that PIL can read") from None
    except PermissionError:
        raise UADError(f"{path}: cannot be read (Permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UADError(f"{path}: truncated or corrupt image ({e})") from None
    h, w = picture.pixels.shape[:2]
    if min(h, w) < MIN_SIZE:
        raise UADError(f"{path}: image is {w}x{h}, at least {MIN_SIZE}x{MIN_SIZE} needed")
    picture.frames, picture.high_bytes = frames, high_bytes
    if not keep_depth and picture.levels != 255:
        picture.pixels = on_lattice(picture.pixels, 255)
    return picture


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two [0, 1] images, in dB (inf when identical)."""
    mse = (a - b).double().pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


LOSSY_FORMATS = {"JPEG"}  # written only when asked (--lossy); everything else must be exact
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True, "exact": True}}
REFUSED_FORMATS = {"ICO": "icons are at most 256 px a side", "ICNS": "icons have fixed sizes"}
# The modes a file of these extensions holds (PIL writes any of its modes under any of them):
# PBM is 1-bit, PGM grey, PPM RGB, PFM float grey
EXTENSION_MODES = {".pbm": (), ".pgm": ("L", "I;16"), ".ppm": ("RGB",), ".pfm": ("F",)}
# The modes a 16-bit or float grey picture may be written in, finest first
WRITTEN_AS = {"F": ("F", "I;16", "L"), "I;16": ("I;16", "L")}
MODE_NAMES = {
    "L": "grey",
    "LA": "grey + alpha",
    "RGB": "RGB",
    "RGBA": "RGB + alpha",
    "I;16": "16-bit grey",
    "F": "float grey",
}


def mode_levels(mode: str) -> Optional[int]:
    """The lattice a picture of `mode` is written on: 65535 (I;16), None (F), else 255."""
    return {"I;16": 65535, "F": None}.get(mode, 255)


def output_format(path) -> str:
    """PIL format name for a file name's extension; PNG when it has none."""
    path = Path(path)
    if not path.suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UADError(f"{path}: cannot write images with extension {path.suffix!r}")
    return fmt


def in_layout_of(saved: Picture, written: Picture) -> Picture:
    """A re-read Picture in the layout written: a grey image that a format stores as three equal
    channels (WebP) comes back grey; an alpha that is 255 everywhere, which a format may drop
    (libwebp does), comes back as such, and one that the written picture lacks is dropped."""
    p, alpha = saved.pixels, saved.alpha
    if p.ndim == 3 and written.pixels.ndim == 2 and (p == p[..., :1]).all():
        p = np.ascontiguousarray(p[..., 0])
    if written.alpha is not None and alpha is None:
        alpha = np.full(p.shape[:2], 255, np.uint8)
    elif written.alpha is None and alpha is not None and (alpha == 255).all():
        alpha = None
    return dataclasses.replace(saved, pixels=p, alpha=alpha)


def same_pixels(saved: Picture, written: Picture) -> bool:
    """Whether a re-read file holds what the pixels written mean: the same values at the same
    depth, in the layout written (a missing alpha is alpha 255 everywhere)."""
    back = in_layout_of(saved, written)
    alpha_ok = (back.alpha is None and written.alpha is None) or (
        back.alpha is not None
        and written.alpha is not None
        and np.array_equal(back.alpha, written.alpha)
    )
    return (
        alpha_ok
        and back.pixels.dtype == written.pixels.dtype
        and back.pixels.shape == written.pixels.shape
        and np.array_equal(back.pixels, written.pixels)
    )


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    return buf.getvalue()


def probe_pictures(mode: str) -> List[Picture]:
    """Random pictures of `mode` to write and read back: one with random alpha and one opaque
    (an alpha of 255 everywhere, which a format may drop) where the mode has alpha."""
    rng = np.random.default_rng(0)
    shape = (23, 37) if mode in ("L", "LA", "I;16", "F") else (23, 37, 3)
    if mode == "I;16":
        pixels = rng.integers(0, 65536, shape, dtype=np.uint16)
    elif mode == "F":
        pixels = rng.random(shape, dtype=np.float32)
    else:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    if not mode.endswith("A"):
        return [Picture(pixels)]
    alphas = rng.integers(0, 256, shape[:2], dtype=np.uint8), np.full(shape[:2], 255, np.uint8)
    return [Picture(pixels, alpha) for alpha in alphas]


def format_problem(fmt: str, mode: str) -> Optional[str]:
    """Why format `fmt` cannot hold a picture of `mode` exactly (see check_format), or None."""
    if fmt in REFUSED_FORMATS:
        return f"{fmt} cannot hold the image ({REFUSED_FORMATS[fmt]}); save as .png"
    what = MODE_NAMES[mode]
    for probe in probe_pictures(mode):
        try:
            data = encode(probe.to_pil(), fmt)
        except Exception:  # PIL raises many kinds for a mode a format cannot take
            return f"{fmt} cannot store {what} images; save as .png"
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                back = to_picture(im)
        except Exception:  # no reader (PDF), or one that needs a program (EPS: Ghostscript)
            return (
                f"PIL writes {fmt} files but cannot read them back to check what they hold; "
                "save as .png"
            )
        if fmt not in LOSSY_FORMATS and not same_pixels(back, probe):
            return (
                f"{fmt} does not store {what} pixels exactly, so the perturbation would not "
                "survive; save as .png"
            )
    return None


def check_format(path: Path, fmt: str, mode: str) -> None:
    """Checks that format `fmt` stores a `mode` picture (L, LA, RGB, RGBA, I;16, F) exactly, by
    writing and re-reading random pixels; lossy formats need only write it. UADError if not."""
    problem = format_problem(fmt, mode)
    if problem is not None:
        raise UADError(f"{path}: {problem}")


def output_mode(path, fmt: str, mode: str) -> str:
    """The mode a `mode` picture is written in as `path` (format `fmt`): its own, or for 16-bit
    and float grey the finest that the format and the extension hold exactly (float, 16-bit,
    8-bit grey). UADError naming the file if there is none."""
    path = Path(path)
    candidates = WRITTEN_AS.get(mode, (mode,))
    ext = path.suffix.lower()
    if ext in EXTENSION_MODES:
        if ext == ".pbm":
            raise UADError(
                f"{path}: a .pbm file holds 1-bit pixels, which cannot hold a perturbation; "
                "save as .png"
            )
        held = EXTENSION_MODES[ext]
        candidates = [m for m in candidates if m in held]
        if not candidates:
            names = " or ".join(MODE_NAMES[m] for m in held)
            raise UADError(
                f"{path}: a {ext} file holds {names} images, not {MODE_NAMES[mode]}; save as .png"
            )
    problems = [format_problem(fmt, m) for m in candidates]
    for m, problem in zip(candidates, problems):
        if problem is None:
            return m
    raise UADError(f"{path}: {problems[0]}")


def default_file_mode(path: Path) -> int:
    """The permissions a plain open(path, "w") would give: an existing file's, else 0666 less
    the umask."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def existing_ancestor(folder: Path) -> Path:
    """The folder itself if it exists, else its nearest existing ancestor."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(path, new_folder: bool = False) -> None:
    """Checks that a file can be written at `path`, by creating and removing a temporary file
    in its folder (os.access alone says yes to root and to read-only file systems). new_folder:
    the folder may be missing, to be created on writing; its nearest existing ancestor is
    checked. Raises UADError naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise UADError(f"{path}: is a folder")
    folder = existing_ancestor(path.parent) if new_folder else path.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise UADError(f"{path}: folder {folder} {problem}")
    if not os.access(folder, os.W_OK):
        raise UADError(f"{path}: cannot write to folder {folder}")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=f".{path.name}."):
            pass
    except OSError as e:
        raise UADError(f"{path}: cannot write to folder {folder} ({e.strerror or e})") from None


def leftover_name(path: Path) -> "re.Pattern":
    """The names write_atomically gives its temporary files for `path`: .NAME.XXXXXXXX.tmp
    (mkstemp's 8 random characters)."""
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_leftovers(path) -> List[Path]:
    """Removes the temporary files of `path` that a killed write left in its folder (a SIGKILL
    skips write_atomically's cleanup) and returns them. Only write_atomically's name pattern for
    this very file is touched; a write of the same file running at the same moment in another
    process would lose its temporary file and fail with one line, writing nothing."""
    path = Path(path)
    pattern, removed = leftover_name(path), []
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # no folder yet: nothing left over
        return removed
    for entry in sorted(entries):
        if pattern.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            try:
                entry.unlink()
            except OSError:
                continue
            removed.append(entry)
    return removed


def write_atomically(path, data: bytes, verify=None) -> None:
    """Writes `path` whole or not at all: a temporary file in its folder, then `verify(tmp)` if
    given (it raises to refuse the file), then a rename into place with the permissions a plain
    save gives. On any failure nothing is left."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UADError(f"{path}: cannot write to folder {path.parent} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, default_file_mode(path))
        os.replace(tmp, path)
    except OSError as e:
        raise UADError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_destination(
    path, overwrite: bool = False, mode: Optional[str] = None, new_folder: bool = False
) -> str:
    """Checks that an image can be written at `path` (see check_writable) and, given a picture
    mode (L, LA, RGB, RGBA, I;16, F), that its format holds such a picture exactly. Returns the
    PIL format; raises UADError naming the problem."""
    path = Path(path)
    fmt = output_format(path)
    if path.exists() and not path.is_dir() and not overwrite:
        raise UADError(f"{path}: exists; pass --overwrite to replace it")
    check_writable(path, new_folder)
    if mode is not None:
        check_format(path, fmt, mode)
    return fmt


def write_image(
    path,
    picture,
    overwrite: bool = False,
    new_folder: bool = False,
    warn: Optional[Callable[[str], None]] = None,
) -> Picture:
    """Saves a Picture (or PIL image) to `path` atomically; returns what the file holds, re-read
    at full depth, in the layout written.

    The temporary file is re-read and checked before it is renamed into place: a lossless
    format must give back exactly the pixels written, at their depth (a dropped alpha of 255
    everywhere counts as kept); a lossy one (JPEG) is only read. Temporary files of `path` left
    by a killed earlier write are removed first, with one line to `warn` (default:
    warnings.warn).
    """
    path = Path(path)
    picture = to_picture(picture) if isinstance(picture, Image.Image) else picture
    fmt = check_destination(path, overwrite, new_folder=new_folder)
    if fmt == "JPEG" and picture.alpha is not None:
        raise UADError(f"{path}: JPEG cannot store the alpha channel; save as .png")
    saved = []

    def verify(tmp):
        saved.append(in_layout_of(read_image(tmp, None, keep_depth=True), picture))
        if fmt not in LOSSY_FORMATS and not same_pixels(saved[0], picture):
            raise UADError(f"{path}: {fmt} did not store the pixels exactly; nothing written")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UADError(f"{path}: cannot write to folder {path.parent} ({e.strerror})") from None
    try:
        data = encode(picture.to_pil(), fmt)
    except OSError as e:  # e.g. no memory for the encoder's buffers
        raise UADError(f"{path}: cannot write ({e.strerror or e})") from None
    removed = remove_leftovers(path)
    if removed:
        (warn or warnings.warn)(
            f"{path}: removed {len(removed)} temporary file(s) left by an interrupted earlier "
            f"write ({', '.join(p.name for p in removed)})"
        )
    write_atomically(path, data, verify)
    return saved[0]
