"""Image files: reading any format PIL reads, writing exactly and atomically.

read_image decodes a file into a Picture (8-bit RGB or grey pixels, alpha and ICC profile
carried through); write_image saves one through a temporary file that is re-read and checked
before it is renamed into place, so a file is written whole, holding exactly the pixels given,
or not at all. Every problem is one uad.UADError line naming the file.
"""

import dataclasses
from dataclasses import dataclass
import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from uad import MIN_SIZE, UADError, uint8_pixels


@dataclass
class Picture:
    """A decoded image: the pixels we attack and what we carry through untouched."""

    pixels: np.ndarray  # (H, W, 3) RGB or (H, W) grey, uint8
    alpha: Optional[np.ndarray] = None  # (H, W) uint8, or None
    icc_profile: Optional[bytes] = None  # the input's colour profile, when it fits the pixels
    frames: int = 1  # frames or pages of the file; only the first is read

    @property
    def mode(self) -> str:
        return ("L" if self.pixels.ndim == 2 else "RGB") + ("A" if self.alpha is not None else "")

    def to_pil(self, pixels: Optional[np.ndarray] = None) -> Image.Image:
        p = self.pixels if pixels is None else pixels
        channels = p if self.alpha is None else np.dstack([p, self.alpha])
        im = Image.fromarray(channels, self.mode)
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


def to_picture(image) -> Picture:
    """A uint8 array or PIL image as a Picture (RGB or grey pixels plus optional alpha)."""
    if isinstance(image, Image.Image):
        im = ImageOps.exif_transpose(image)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        alpha = np.asarray(im.getchannel("A")) if im.mode in ALPHA_MODES else None
        if im.mode.startswith("I") or im.mode == "F":  # 16-bit or float grey, scaled to 8 bits
            a = np.asarray(im, dtype=np.float64)
            top = 1.0 if im.mode == "F" and a.max() <= 1.0 else 65535.0 if a.max() > 255 else 255.0
            pixels = np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8)
        else:
            pixels = np.asarray(im.convert("L" if im.mode in GREY_MODES else "RGB"))
        profile = matching_profile(
            image.info.get("icc_profile"), "L" if pixels.ndim == 2 else "RGB"
        )
        return Picture(np.ascontiguousarray(pixels), alpha, profile)
    return Picture(uint8_pixels(image))


# PIL's own limit against decompression bombs (about 9459 x 9459): beyond it, --max-pixels
MAX_PIXELS = 89_478_485


def read_image(path, max_pixels: Optional[int] = MAX_PIXELS) -> Picture:
    """Reads an image file into 8-bit RGB or grey pixels plus an optional alpha channel.

    EXIF orientation is applied; palette, CMYK and other colour modes become RGB; 16-bit and
    float grey images are scaled to 8 bits; an RGB or grey ICC profile is kept. Only the first
    frame of an animation or multi-page file is read (Picture.frames counts them). An image of
    more than max_pixels pixels (None: no limit) is refused from its header, before decoding.
    Any problem raises UADError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise UADError(f"{path}: is a folder, expected an image file")
    if not path.exists():
        raise UADError(f"{path}: no such file")
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
            im.load()
            picture = to_picture(im)  # applies the EXIF orientation, keeps a fitting profile
    except Image.UnidentifiedImageError:
        raise UADError(f"{path}: not an image file that PIL can read") from None
    except PermissionError:
        raise UADError(f"{path}: cannot be read (Permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UADError(f"{path}: truncated or corrupt image ({e})") from None
    h, w = picture.pixels.shape[:2]
    if min(h, w) < MIN_SIZE:
        raise UADError(f"{path}: image is {w}x{h}, at least {MIN_SIZE}x{MIN_SIZE} needed")
    picture.frames = frames
    return picture


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two [0, 1] images, in dB (inf when identical)."""
    mse = (a - b).double().pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


LOSSY_FORMATS = {"JPEG"}  # written with a warning; everything else must hold the result exactly
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True, "exact": True}}
REFUSED_FORMATS = {"ICO": "icons are at most 256 px a side", "ICNS": "icons have fixed sizes"}


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
    channels (WebP) comes back grey."""
    p = saved.pixels
    if p.ndim == 3 and written.pixels.ndim == 2 and (p == p[..., :1]).all():
        return dataclasses.replace(saved, pixels=np.ascontiguousarray(p[..., 0]))
    return saved


def same_pixels(saved: Picture, written: Picture) -> bool:
    """Whether a re-read file holds the pixels written, in the layout written."""
    pixels = in_layout_of(saved, written).pixels
    alpha_ok = (saved.alpha is None and written.alpha is None) or (
        saved.alpha is not None
        and written.alpha is not None
        and np.array_equal(saved.alpha, written.alpha)
    )
    return (
        alpha_ok and pixels.shape == written.pixels.shape and np.array_equal(pixels, written.pixels)
    )


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    return buf.getvalue()


def check_format(path: Path, fmt: str, mode: str) -> None:
    """Checks that format `fmt` stores a `mode` picture (L, LA, RGB, RGBA) exactly, by writing
    and re-reading random pixels; lossy formats need only write it. UADError if not."""
    if fmt in REFUSED_FORMATS:
        raise UADError(
            f"{path}: {fmt} cannot hold the image ({REFUSED_FORMATS[fmt]}); save as .png"
        )
    rng = np.random.default_rng(0)
    shape = (23, 37) if mode.startswith("L") else (23, 37, 3)
    probe = Picture(
        rng.integers(0, 256, shape, dtype=np.uint8),
        rng.integers(0, 256, shape[:2], dtype=np.uint8) if mode.endswith("A") else None,
    )
    what = {"L": "grey", "LA": "grey + alpha", "RGB": "RGB", "RGBA": "RGB + alpha"}[mode]
    try:
        data = encode(probe.to_pil(), fmt)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            back = to_picture(im)
    except Exception:  # PIL raises many kinds for a mode a format cannot take
        raise UADError(f"{path}: {fmt} cannot store {what} images; save as .png") from None
    if fmt not in LOSSY_FORMATS and not same_pixels(back, probe):
        raise UADError(
            f"{path}: {fmt} does not store {what} pixels exactly, so the perturbation would not "
            "survive; save as .png"
        )


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
    mode (L, LA, RGB, RGBA), that its format holds such a picture exactly. Returns the PIL
    format; raises UADError naming the problem."""
    path = Path(path)
    fmt = output_format(path)
    if path.exists() and not path.is_dir() and not overwrite:
        raise UADError(f"{path}: exists; pass --overwrite to replace it")
    check_writable(path, new_folder)
    if mode is not None:
        check_format(path, fmt, mode)
    return fmt


def write_image(path, picture, overwrite: bool = False, new_folder: bool = False) -> Picture:
    """Saves a Picture (or PIL image) to `path` atomically; returns what the file holds, re-read,
    in the layout written.

    The temporary file is re-read and checked before it is renamed into place: a lossless
    format must give back exactly the pixels written; a lossy one (JPEG) is only read.
    """
    path = Path(path)
    picture = to_picture(picture) if isinstance(picture, Image.Image) else picture
    fmt = check_destination(path, overwrite, new_folder=new_folder)
    if fmt == "JPEG" and picture.alpha is not None:
        raise UADError(f"{path}: JPEG cannot store the alpha channel; save as .png")
    saved = []

    def verify(tmp):
        saved.append(in_layout_of(read_image(tmp, max_pixels=None), picture))
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
    write_atomically(path, data, verify)
    return saved[0]
