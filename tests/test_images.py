"""Image files: colour modes, EXIF, ICC, the pixel limit, unreadable files, atomic writes."""

import numpy as np
import pytest
from PIL import Image

import uad
import unsegment.images
from helpers import png_header_only, small_photo


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

    monkeypatch.setattr(uad.Image, "open", denied)
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
