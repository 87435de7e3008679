"""Image files: colour modes and their ranges, EXIF, ICC, the pixel limit, unreadable files,
output formats and extensions, atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

import uad
import unsegment.images
from helpers import deep_inputs, png_16bit, png_header_only, small_photo


def test_read_image_converts_every_colour_mode(tmp_path):
    rgb = small_photo()
    grey = rgb[..., 1]
    h, w = grey.shape
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey
    with_exif = Image.fromarray(rgb)
    exif = with_exif.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    with_exif.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    palette = unsegment.images.read_image(tmp_path / "palette.png")
    assert palette.pixels.shape == (h, w, 3) and palette.alpha is None
    cmyk = unsegment.images.read_image(tmp_path / "cmyk.tif")
    assert cmyk.pixels.shape == (h, w, 3) and np.abs(cmyk.pixels.astype(int) - rgb).mean() < 8
    deep = unsegment.images.read_image(tmp_path / "deep.png")
    assert deep.pixels.dtype == np.uint8 and np.array_equal(deep.pixels, grey)
    deep = unsegment.images.read_image(tmp_path / "deep.png", keep_depth=True)
    assert deep.pixels.dtype == np.uint16 and np.array_equal(
        deep.pixels, grey.astype(np.uint16) * 257
    )
    rotated = unsegment.images.read_image(tmp_path / "rotated.jpg")
    assert rotated.pixels.shape == (w, h, 3)


def test_bomb_limit_names_the_flag_that_raises_it(tmp_path):
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(uad.UADError, match=r"pass --max-pixels 900000000 to process it"):
        unsegment.images.read_image(tmp_path / "bomb.png")


def test_an_unreadable_file_says_so(tmp_path, monkeypatch):
    Image.fromarray(small_photo()).save(tmp_path / "locked.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(unsegment.images.Image, "open", denied)
    with pytest.raises(uad.UADError, match="locked.png: cannot be read .Permission denied."):
        unsegment.images.read_image(tmp_path / "locked.png")


def test_icc_profile_of_another_colour_space_is_not_carried():
    rgb_profile = b"\0" * 16 + b"RGB " + b"\0" * 108
    cmyk_profile = b"\0" * 16 + b"CMYK" + b"\0" * 108
    assert unsegment.images.matching_profile(rgb_profile, "RGB") == rgb_profile
    assert unsegment.images.matching_profile(rgb_profile, "L") is None
    assert unsegment.images.matching_profile(cmyk_profile, "RGB") is None


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(uad.UADError, match="o.png: cannot write .No space left"):
        unsegment.images.write_image(tmp_path / "o.png", Image.fromarray(small_photo()))
    assert list(tmp_path.iterdir()) == []


def test_a_mode_states_its_range_whatever_the_values(tmp_path):
    # 16-bit grey is 0..65535 even when every value is <= 255 (a dark photo): never read as 8-bit
    dark = small_photo()[..., 1].astype(np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(dark).save(tmp_path / "dark.pgm")  # PIL reads 16-bit PGM as mode I
    for name in ("dark.png", "dark.pgm"):
        picture = unsegment.images.read_image(tmp_path / name, keep_depth=True)
        assert picture.mode == "I;16" and picture.levels == 65535
        assert np.array_equal(picture.pixels, dark), name
        eight = unsegment.images.read_image(tmp_path / name).pixels
        assert eight.dtype == np.uint8 and eight.max() <= 1  # 255 / 65535 of full scale
    floats = (dark + 0.5).astype(np.float32) / 256
    Image.fromarray(floats).save(tmp_path / "float.tif")
    picture = unsegment.images.read_image(tmp_path / "float.tif", keep_depth=True)
    assert picture.mode == "F" and picture.levels is None
    assert np.array_equal(picture.pixels, floats)
    eight = unsegment.images.read_image(tmp_path / "float.tif").pixels
    assert np.array_equal(eight, np.round(floats.astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "values, message",
    [
        (np.float32(1.2), "float image values run from 0 to 1.2, not within [0, 1]"),
        (np.float32(-0.1), "float image values run from -0.1 to"),
        (np.float32(np.nan), "float image holds NaN or infinite values"),
        (np.int32(70000), "I image values run from 0 to 70000, outside the 16-bit range"),
    ],
)
def test_values_outside_their_mode_s_range_are_refused(tmp_path, values, message):
    grey = small_photo()[..., 1]
    a = (grey / 255).astype(values.dtype) if values.dtype.kind == "f" else grey.astype(values.dtype)
    a[0, 0], a[5, 7] = 0, values
    Image.fromarray(a).save(tmp_path / "odd.tif")
    with pytest.raises(uad.UADError) as e:
        unsegment.images.read_image(tmp_path / "odd.tif", keep_depth=True)
    assert str(e.value).startswith(f"{tmp_path / 'odd.tif'}: {message}"), e.value


def test_16bit_rgb_is_read_from_its_high_bytes_and_says_so(tmp_path):
    values = deep_inputs(tmp_path)["rgb16"][1] * 65535
    picture = unsegment.images.read_image(tmp_path / "rgb16.png", keep_depth=True)
    assert picture.high_bytes and picture.mode == "RGB"
    assert np.array_equal(picture.pixels, (values.astype(np.uint16) >> 8).astype(np.uint8))
    assert np.abs(picture.pixels / 255 - values / 65535).max() <= 1 / 257  # under one level
    assert not unsegment.images.read_image(tmp_path / "dark16.png").high_bytes  # grey: I;16
    png_16bit(tmp_path / "grey16.png", small_photo()[..., 1].astype(np.uint16) * 257)
    assert not unsegment.images.read_image(tmp_path / "grey16.png").high_bytes


def test_a_fifo_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(uad.UADError, match=r"pipe.png: not a regular file \(a FIFO\)"):
        unsegment.images.read_image(tmp_path / "pipe.png")


# mode of the picture, output file name -> the mode written, or the start of the refusal
OUTPUT_MODES = [
    ("RGB", "o.png", "RGB"),
    ("I;16", "o.png", "I;16"),
    ("I;16", "o.tif", "I;16"),
    ("I;16", "o.bmp", "L"),  # no 16-bit grey in BMP: 8-bit
    ("I;16", "o.webp", "L"),
    ("F", "o.tif", "F"),
    ("F", "o.png", "I;16"),  # no float in PNG: 16-bit
    ("F", "o.bmp", "L"),
    ("F", "o.pfm", "F"),
    ("F", "o.pgm", "I;16"),
    ("L", "o.pgm", "L"),
    ("RGB", "o.ppm", "RGB"),
    ("RGB", "o.pnm", "RGB"),
    ("RGBA", "o.webp", "RGBA"),
    ("RGB", "o.pgm", "o.pgm: a .pgm file holds grey or 16-bit grey images, not RGB"),
    ("L", "o.ppm", "o.ppm: a .ppm file holds RGB images, not grey"),
    ("RGBA", "o.ppm", "o.ppm: a .ppm file holds RGB images, not RGB + alpha"),
    ("L", "o.pbm", "o.pbm: a .pbm file holds 1-bit pixels, which cannot hold a perturbation"),
    ("I;16", "o.pfm", "o.pfm: a .pfm file holds float grey images, not 16-bit grey"),
    ("RGB", "o.pdf", "o.pdf: PIL writes PDF files but cannot read them back"),
    ("RGB", "o.eps", "o.eps: PIL writes EPS files but cannot read them back"),
    ("RGB", "o.gif", "o.gif: GIF does not store RGB pixels exactly"),
    ("RGBA", "o.jpg", "o.jpg: JPEG cannot store RGB + alpha images"),
]


@pytest.mark.parametrize("mode, name, expected", OUTPUT_MODES)
def test_each_output_holds_the_picture_exactly_at_the_finest_depth_it_can(mode, name, expected):
    fmt = unsegment.images.output_format(name)
    if ":" not in expected:
        assert unsegment.images.output_mode(name, fmt, mode) == expected
    else:
        with pytest.raises(uad.UADError) as e:
            unsegment.images.output_mode(name, fmt, mode)
        assert str(e.value).startswith(expected), e.value


def test_an_alpha_that_webp_drops_because_it_is_opaque_counts_as_kept(tmp_path):
    rgba = np.dstack([small_photo(), np.full(small_photo().shape[:2], 255, np.uint8)])
    picture = unsegment.images.Picture(small_photo(), rgba[..., 3])
    saved = unsegment.images.write_image(tmp_path / "o.webp", picture)
    assert np.array_equal(saved.pixels, small_photo()) and (saved.alpha == 255).all()
    with Image.open(tmp_path / "o.webp") as im:
        assert im.mode == "RGB"  # libwebp stored no alpha


def test_deep_pictures_are_written_at_their_depth_and_checked_at_it(tmp_path):
    dark = small_photo()[..., 1].astype(np.uint16) * 3
    saved = unsegment.images.write_image(tmp_path / "o.png", unsegment.images.Picture(dark))
    assert saved.pixels.dtype == np.uint16 and np.array_equal(saved.pixels, dark)
    floats = np.random.default_rng(0).random((20, 30), dtype=np.float32)
    saved = unsegment.images.write_image(tmp_path / "o.tif", unsegment.images.Picture(floats))
    assert saved.pixels.dtype == np.float32 and np.array_equal(saved.pixels, floats)
    with pytest.raises(uad.UADError, match="o.webp: WEBP did not store the pixels exactly"):
        unsegment.images.write_image(tmp_path / "o.webp", unsegment.images.Picture(dark))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "o.tif"]


def test_a_killed_write_s_temporary_files_are_removed_by_the_next_write(tmp_path):
    ours = [tmp_path / ".o.png.ab3_x9zq.tmp", tmp_path / ".o.png.00000000.tmp"]
    theirs = [
        tmp_path / ".o.png.short.tmp",  # not mkstemp's 8 characters
        tmp_path / ".o.png.ab3_x9zq.tmp.keep",
        tmp_path / ".o2.png.ab3_x9zq.tmp",  # another file's
        tmp_path / "o.png.ab3_x9zq.tmp",  # not hidden
    ]
    for path in ours + theirs:
        path.write_bytes(b"partial")
    said = []
    unsegment.images.write_image(
        tmp_path / "o.png", Image.fromarray(small_photo()), warn=said.append
    )
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert said == [
        f"{tmp_path / 'o.png'}: removed 2 temporary file(s) left by an interrupted earlier write "
        "(.o.png.00000000.tmp, .o.png.ab3_x9zq.tmp)"
    ]
    unsegment.images.write_image(
        tmp_path / "o.png", Image.fromarray(small_photo()), overwrite=True, warn=said.append
    )
    assert len(said) == 1  # nothing left over: nothing said
