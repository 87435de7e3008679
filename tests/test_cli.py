"""uad.py's command line on a tiny SAM: files, folders, formats, flags, progress, bad input."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import uad
import unsegment.cli
import unsegment.cost
import unsegment.images
import unsegment.progress
from helpers import (
    EXAMPLES,
    ROOT,
    deep_inputs,
    full_precision,
    png_16bit,
    png_header_only,
    small_photo,
)

# few steps; the reference preset keeps the encoder out of stage 1 (the paper preset has its own
# tests)
FAST = ["--preset", "reference", "--steps", "3", "--deform-steps", "2", "--quiet"]


def test_cli_protects_a_photo_within_the_budget(cli, example_image, tmp_path):
    out = tmp_path / "protected.png"
    code, stdout, stderr = cli(
        example_image,
        out,
        "--eps",
        8,
        "--steps",
        3,
        "--deform-steps",
        2,
        "--proxy-steps",
        1,
        "--quiet",
    )
    assert code == 0, stderr
    clean, saved = Image.open(example_image), Image.open(out)
    assert saved.size == clean.size and saved.mode == clean.mode
    diff = np.abs(np.asarray(saved, np.int16) - np.asarray(clean, np.int16))
    assert 0 < diff.max() <= 8
    assert f"L-inf {diff.max()}/255" in stdout and "PSNR" in stdout and "SSIM" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coffee.png", "protected.png"]


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(cli, example_image, tmp_path):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (5, 5, 6)):
        assert cli(example_image, path, "--seed", seed, *FAST)[0] == 0
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c


def test_alpha_and_grey_files_are_carried_through(cli, tmp_path):
    pixels = small_photo()
    alpha = (np.indices(pixels.shape[:2]).sum(0) % 256).astype(np.uint8)
    cases = {"rgba.png": np.dstack([pixels, alpha]), "grey.png": pixels[..., 0]}
    for name, array in cases.items():
        Image.fromarray(array).save(tmp_path / name)
        code, _, err = cli(tmp_path / name, tmp_path / f"out_{name}", *FAST)
        assert code == 0, err
        saved = np.asarray(Image.open(tmp_path / f"out_{name}"))
        assert saved.shape == array.shape
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out_rgba.png"))[..., 3], alpha)


def test_jpeg_is_written_only_with_lossy_and_its_summary_says_how_far_over(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    code, out, err = cli(tmp_path / "in.png", tmp_path / "out.jpg", *FAST)  # refused: early rows
    assert code != 0 and "--lossy" in err and not (tmp_path / "out.jpg").exists()
    code, out, err = cli(tmp_path / "in.png", tmp_path / "out.jpg", "--lossy", *FAST)
    assert code == 0, err
    saved = np.asarray(Image.open(tmp_path / "out.jpg"), np.int16)
    linf = np.abs(saved - small_photo()).max()
    assert linf > 8 and f"L-inf {linf}/255 (over the 8/255 budget: JPEG is lossy)" in out


def test_folder_mode_protects_every_image_and_survives_a_bad_one(cli, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(small_photo()).save(src / "a.png")
    Image.fromarray(small_photo()[::-1].copy()).save(src / "c.png")
    (src / "b.png").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("ignored: not an image file name")
    code, out, err = cli(src, dst, *FAST)
    assert code == 1
    assert "2 protected, 1 failed" in out
    assert "b.png" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in dst.iterdir()) == ["a.png", "c.png"]


def test_preview_shows_the_original_the_file_saved_and_the_perturbation(cli, tmp_path):
    import unsegment.report as report

    photo = small_photo()  # 96 x 64
    Image.fromarray(photo).save(tmp_path / "in.png")
    out, preview = tmp_path / "out.png", tmp_path / "preview.png"
    code, _, err = cli(tmp_path / "in.png", out, "--preview", preview, *FAST)
    assert code == 0, err
    saved = unsegment.images.read_image(out).pixels
    with Image.open(preview) as im:
        assert im.format == "PNG"
        shown = np.asarray(im.convert("RGB"))
    top, left = report.GAP + report.LINE, report.GAP  # under the (empty) title line
    panels = [shown[top : top + 64, left : left + 96]]
    for _ in range(2):  # each panel is at least as wide as its caption
        left += max(96, int(report.FONT.getlength("original")) + 4) + report.GAP
        panels.append(shown[top : top + 64, left : left + 96])
    np.testing.assert_array_equal(panels[0], photo)
    np.testing.assert_array_equal(panels[1], saved)
    diff = np.abs(saved.astype(int) - photo)  # at most 8: eps (8/255) is white
    assert 0 < diff.max() <= 8
    np.testing.assert_array_equal(panels[2], np.rint(diff * 255 / 8).astype(np.uint8))
    # folder mode: one picture per image, in the folder --preview names (made if missing)
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(photo).save(folder / f"{name}.png")
    code, _, err = cli(folder, tmp_path / "out", "--preview", tmp_path / "out" / "previews", *FAST)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out" / "previews").iterdir()) == ["a.png", "b.png"]


def test_cli_reports_which_preset_ran(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    args = [tmp_path / "in.png", tmp_path / "out.png", "--steps", "1", "--deform-steps", "1"]
    code, _, err = cli(*args, "--preset", "paper", "--proxy-steps", "1")
    assert code == 0 and "preset paper" in err and "deform 1/1" in err and "simulate 1/1" in err


def test_a_trailing_slash_names_a_folder_made_on_the_first_write(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    for out in (f"{tmp_path / 'protected'}/", f"{tmp_path / 'a' / 'b'}{os.sep}"):
        code, _, err = cli(tmp_path / "in.png", out, *FAST)
        assert code == 0, err
        assert [p.name for p in Path(out).iterdir()] == ["in.png"]
    (tmp_path / "existing").mkdir()  # an existing folder needs no slash, as before
    assert cli(tmp_path / "in.png", tmp_path / "existing", *FAST)[0] == 0
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["in.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "existing", "in.png", "protected"]


def test_folder_mode_skips_hidden_files_and_says_what_it_skipped(cli, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(small_photo()).save(src / "a.png")
    Image.fromarray(small_photo()).save(src / ".hidden.png")  # a dot-file is not protected
    (src / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble metadata")
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / "sub").mkdir()
    Image.fromarray(small_photo()).save(src / "sub" / "b.png")
    (src / "notes.txt").write_text("not an image")
    code, out, err = cli(src, dst, *FAST[:-1])
    assert code == 0, err
    assert [p.name for p in dst.iterdir()] == ["a.png"]
    skipped = [line for line in err.splitlines() if "skipping" in line]
    assert skipped == [
        f"warning: {src}: skipping 5 entries: 3 hidden (name starting with '.'), "
        "1 folder(s), not searched, 1 not image file(s)"
    ]
    assert "error" not in err
    (src / "a.png").rename(src / ".a.png")
    code, _, err = cli(src, tmp_path / "out2", *FAST)
    assert code == 1 and "no image files in this folder (" in err and "4 hidden" in err


def test_folder_with_one_image_into_a_new_folder(cli, tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(small_photo()).save(tmp_path / "in" / "only.png")
    code, out, err = cli(tmp_path / "in", tmp_path / "new" / "out", *FAST)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "new" / "out").iterdir()] == ["only.png"]


def test_header_says_what_a_cpu_run_costs_and_folder_progress_names_the_file(cli, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(small_photo()).save(tmp_path / "in" / name)
    code, out, err = cli(tmp_path / "in", tmp_path / "out", *FAST[:-1], "--device", "cpu")
    assert code == 0, err
    assert "on a CPU expect about" in err and "(5 encoder forwards, 3 backwards" in err
    assert "[1/2] a.png: simulate 3/3" in err and "[2/2] b.png" in err
    code, _, err = cli(
        tmp_path / "in" / "a.png",
        tmp_path / "p.png",
        "--steps",
        "1",
        "--deform-steps",
        "1",
        "--proxy-steps",
        "1",
        "--device",
        "cpu",
    )
    assert "--preset no-fidelity takes about" in err


def test_the_header_says_what_each_method_does(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    runs = {
        "noise": ["--preset", "noise"],
        "aa": ["--preset", "aa", "--target-image", tmp_path / "in.png", "--steps", "2"],
        "no-fidelity": ["--preset", "no-fidelity", "--steps", "2", "--deform-steps", "1"],
    }
    said = {}
    for name, args in runs.items():
        code, _, err = cli(tmp_path / "in.png", tmp_path / f"{name}.png", *args, "--device", "cpu")
        assert code == 0, err
        said[name] = err.splitlines()[0]
    assert "uniform noise, no steps" in said["noise"] and "deformation" not in said["noise"]
    assert "PGD" not in said["noise"]
    assert ", 2 PGD steps, " in said["aa"] and "deformation" not in said["aa"]
    assert f"towards the features of {tmp_path / 'in.png'}" in said["aa"]
    assert ", 1 deformation + 2 PGD steps, " in said["no-fidelity"]


def test_the_cpu_estimate_names_the_machine_it_was_measured_on_and_this_one(
    cli, tmp_path, monkeypatch
):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    args = [tmp_path / "in.png", tmp_path / "o.png", "--preset", "noise", "--device", "cpu"]
    code, _, err = cli(*args, "--dtype", "bfloat16")
    assert code == 0, err
    line = err.splitlines()[1]
    assert f"priced at the speed measured on {unsegment.cost.CPU_PASS_MACHINE}" in line
    assert "AMD EPYC" in line and f"this CPU, {unsegment.cost.cpu_model()}, may differ" in line
    assert unsegment.cost.cpu_model() and "2-core AVX-512" not in line
    # without native bfloat16 PyTorch emulates it: priced as float32, and the line says so
    monkeypatch.setattr(unsegment.cost, "native_bfloat16", lambda: False)
    code, _, err = cli(*args, "--dtype", "bfloat16", "--overwrite")
    assert code == 0, err
    assert "bfloat16 priced as float32: this CPU has no native bfloat16" in err
    assert "multiplies bfloat16 natively" not in err
    bf16, fp32 = (uad.UADConfig(dtype=d) for d in ("bfloat16", "float32"))
    assert unsegment.cost.cpu_estimate(bf16, 100.0, 2) == unsegment.cost.cpu_estimate(
        fp32, 100.0, 2
    )
    monkeypatch.setattr(unsegment.cost, "native_bfloat16", lambda: True)
    assert unsegment.cost.cpu_estimate(bf16, 100.0, 2) < unsegment.cost.cpu_estimate(fp32, 100.0, 2)
    code, _, err = cli(*args, "--dtype", "bfloat16", "--overwrite")
    assert code == 0 and "priced as float32" not in err


def test_progress_eta_counts_the_first_step(monkeypatch):
    clock = iter([100.0, 100.0, 110.0, 120.0])
    monkeypatch.setattr(uad.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    progress = unsegment.progress.Progress(stream=stream)
    progress("simulate", 0, 4)  # the stage starts at t = 100
    progress("simulate", 1, 4, 0.5)  # t = 110: 10 s a step, 3 steps left
    assert stream.getvalue().splitlines()[-1] == "simulate 1/4 loss +0.5000 eta 0:30"


def test_help_gives_units_ranges_and_choices(cli):
    code, out, _ = cli("--help", checkpoint=None)
    assert code == 0
    flat = " ".join(out.split())
    assert "--eps X L-infinity budget, 1 to 64 in 1/255 [8]" in flat
    assert "--alpha X PGD step size in 1/255 [2]" in flat
    assert "{vit_b,vit_l,vit_h}" in flat and "{paper,no-fidelity,aa,noise,reference}" in flat


def test_baselines_through_the_cli_are_within_eps_and_seeded(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    Image.fromarray(small_photo((64, 64))).save(tmp_path / "other.png")
    runs = {}
    for name, args in {
        "aa": ["--preset", "aa", "--target-image", tmp_path / "other.png"],
        "noise": ["--preset", "noise"],
    }.items():
        for seed in (1, 1, 2):
            out = tmp_path / f"{name}{seed}.png"
            out.unlink(missing_ok=True)
            code, _, err = cli(
                tmp_path / "in.png", out, *args, "--steps", 3, "--seed", seed, "--quiet"
            )
            assert code == 0, err
            runs.setdefault(name, []).append(out.read_bytes())
            diff = np.abs(unsegment.images.read_image(out).pixels.astype(int) - small_photo())
            assert 0 < diff.max() <= 8
        assert runs[name][0] == runs[name][1], name
    assert runs["noise"][0] != runs["noise"][2]  # aa draws nothing: its seed changes nothing


# ------------------------------------------------------------------------------------------
# Output formats: exact within eps, or refused before the attack


def writable_formats() -> dict:
    """One extension per format PIL can write: {format: extension}."""
    formats = {}
    for ext, fmt in sorted(Image.registered_extensions().items()):
        if fmt in Image.SAVE:
            formats.setdefault(fmt, ext)
    return formats


@pytest.mark.parametrize("fmt", sorted(writable_formats()))
def test_every_output_format_is_exact_or_refused_before_the_attack(cli, tmp_path, fmt):
    pixels = small_photo()
    Image.fromarray(pixels).save(tmp_path / "in.png")
    out = tmp_path / f"out{writable_formats()[fmt]}"
    code, _, err = cli(tmp_path / "in.png", out, *FAST)
    if code != 0:  # refused: one line naming the file, nothing written, before any work
        assert len(err.strip().splitlines()) == 1 and str(out) in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
        return
    saved = unsegment.images.read_image(out).pixels.astype(int)
    linf = np.abs(saved - pixels).max()
    assert 0 < linf <= 8, (fmt, linf)  # JPEG, lossy, is refused without --lossy


def test_the_formats_people_use_are_written_and_gif_is_refused(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    for ext in (".png", ".tif", ".webp", ".bmp", ".ppm"):
        assert cli(tmp_path / "in.png", tmp_path / f"o{ext}", *FAST)[0] == 0, ext
    assert cli(tmp_path / "in.png", tmp_path / "o.jpg", "--lossy", *FAST)[0] == 0
    webp = unsegment.images.read_image(tmp_path / "o.webp").pixels.astype(int)
    assert np.abs(webp - small_photo()).max() <= 8  # lossless WebP: exactly within eps
    assert cli(tmp_path / "in.png", tmp_path / "o.gif", *FAST)[0] != 0


def test_opaque_rgba_to_webp_is_written_within_eps(cli, tmp_path):
    # libwebp drops an alpha of 255 everywhere: the file means the same pixels, and is kept
    rgba = np.dstack([small_photo(), np.full(small_photo().shape[:2], 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    code, out, err = cli(tmp_path / "opaque.png", tmp_path / "o.webp", *FAST)
    assert code == 0, err
    saved = unsegment.images.read_image(tmp_path / "o.webp")
    assert saved.alpha is None or (saved.alpha == 255).all()
    assert 0 < np.abs(saved.pixels.astype(int) - small_photo()).max() <= 8


# ------------------------------------------------------------------------------------------
# Inputs finer than 8 bits: each mode at its own range, written at the finest depth the output
# holds, within eps of the input's own values


def within_eps(out: Path, values: np.ndarray, eps: float = 8 / 255) -> float:
    """The file's L-infinity distance from `values` ([0, 1], full precision), asserted <= eps."""
    got = full_precision(out)
    if got.ndim == 3 and values.ndim == 2:  # grey stored as three equal channels (WebP)
        assert (got == got[..., :1]).all()
        got = got[..., 0]
    linf = np.abs(got - values).max()
    assert 0 < linf <= eps + 1e-12, linf * 255
    return linf


@pytest.mark.parametrize(
    "name, ext, written, tag",
    [
        ("dark16", ".png", "I;16", "(16-bit)"),
        ("dark16", ".tif", "I;16", "(16-bit)"),
        ("dark16", ".bmp", "L", "(16-bit written 8-bit)"),
        ("rgb16", ".png", "RGB", "from PIL's 8-bit reading, under {}/255 from the 16-bit file"),
        ("float", ".tif", "F", "(float)"),
        ("float", ".png", "I;16", "(float written 16-bit)"),
        ("float", ".pfm", "F", "(float)"),
    ],
)
def test_deep_inputs_are_written_within_eps_of_their_own_values(
    cli, tmp_path, name, ext, written, tag
):
    src, values = deep_inputs(tmp_path)[name]
    out = tmp_path / f"out{ext}"
    code, stdout, err = cli(src, out, *FAST[:-1])
    assert code == 0, err
    with Image.open(out) as im:
        assert im.mode == written or (written == "I;16" and im.mode == "I"), im.mode
    linf = within_eps(out, values)
    shown = re.match(rf"{re.escape(str(out))}: L-inf ([\d.]+)/255 (.*?), PSNR", stdout)
    assert shown, stdout
    if name == "rgb16":  # measured on PIL's high bytes, which are under one level off
        n = int(shown[1])
        assert n - 1 < linf * 255 < n + 1 and shown[2] == tag.format(n + 1), stdout
    else:
        assert abs(float(shown[1]) - linf * 255) < 1e-3 and shown[2] == tag, stdout
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    if tag in ("(16-bit)", "(float)"):  # the input's own depth: nothing to say
        assert warnings == []
    else:  # written coarser than the input, or read from its high bytes: one line says so
        assert len(warnings) == 1 and "level of the budget covers the rounding" in warnings[0]


def test_a_dark_16bit_image_keeps_its_darkness(cli, tmp_path):
    # every value <= 255: a guess from the maximum read it as 8-bit and wrote it 195/255 brighter
    src, values = deep_inputs(tmp_path)["dark16"]
    assert values.max() <= 255 / 65535
    assert cli(src, tmp_path / "out.webp", *FAST)[0] == 0  # WebP: 8-bit
    assert full_precision(tmp_path / "out.webp").max() <= (1 + 8) / 255
    within_eps(tmp_path / "out.webp", values)


def test_pixels_over_the_budget_are_never_written(cli, tmp_path, monkeypatch):
    # a check of the arithmetic before the write: a rounding bug would be one line, not a file
    src, _ = deep_inputs(tmp_path)["dark16"]
    over = lambda adv, image, eps, levels=255: (image + 9 / 255).clamp(0, 1)  # noqa: E731
    monkeypatch.setattr(unsegment.cli, "quantize", over)
    code, out, err = cli(src, tmp_path / "o.png", *FAST)
    assert code == 1 and out == "" and not (tmp_path / "o.png").exists()
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'o.png'}: the protected pixels are 9/255 from the input, over the "
        "8/255 budget; nothing written"
    ]


def test_a_killed_write_leaves_a_temporary_file_the_next_write_removes(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    leftover = tmp_path / ".o.png.k3_x9a2q.tmp"  # write_atomically's name, its process killed
    leftover.write_bytes(b"partial")
    other = tmp_path / ".other.png.k3_x9a2q.tmp"  # another file's: not ours to remove
    other.write_bytes(b"partial")
    code, _, err = cli(tmp_path / "in.png", tmp_path / "o.png", *FAST[:-1])
    assert code == 0, err
    assert not leftover.exists() and other.exists()
    assert "o.png: removed 1 temporary file(s) left by an interrupted earlier write" in err


def test_outputs_get_the_permissions_of_a_normal_save(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    old = os.umask(0o027)
    try:
        assert cli(tmp_path / "in.png", tmp_path / "new.png", *FAST)[0] == 0
        existing = tmp_path / "existing.png"
        existing.write_bytes(b"")
        existing.chmod(0o604)
        assert cli(tmp_path / "in.png", existing, "--overwrite", *FAST)[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o640
    assert existing.stat().st_mode & 0o777 == 0o604


def test_icc_profile_is_kept_and_dropped_frames_are_named(cli, tmp_path):
    rocket = EXAMPLES / "rocket.jpg"
    with Image.open(rocket) as im:
        profile = im.info["icc_profile"]
        im.convert("RGB").resize((96, 64)).save(tmp_path / "rocket.jpg", icc_profile=profile)
    assert cli(tmp_path / "rocket.jpg", tmp_path / "rocket.png", *FAST)[0] == 0
    with Image.open(tmp_path / "rocket.png") as im:
        assert im.info.get("icc_profile") == profile

    frames = [Image.fromarray(small_photo()), Image.fromarray(small_photo()[::-1].copy())]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    code, _, err = cli(tmp_path / "pages.tif", tmp_path / "pages.png", *FAST[:-1])
    assert code == 0 and "pages.tif: only the first of its 2 frames is protected" in err


# ------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the problem, non-zero exit, nothing written


def bad_inputs(tmp_path: Path) -> dict:
    good = tmp_path / "good.png"
    Image.fromarray(small_photo()).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    return {
        "missing": ([tmp_path / "nope.png", tmp_path / "o.png"], "nope.png: no such file"),
        "empty": ([tmp_path / "empty.png", tmp_path / "o.png"], "empty.png: empty file"),
        "not an image": ([tmp_path / "text.png", tmp_path / "o.png"], "text.png: not an image"),
        "truncated": ([truncated, tmp_path / "o.png"], "truncated.png: truncated or corrupt"),
        "folder as file": ([tmp_path / "folder.png", tmp_path / "o.png"], "no image files"),
        "output is input": ([good, good], "output is the input file"),
        "no such folder": ([good, tmp_path / "nowhere" / "o.png"], "does not exist"),
        "bad extension": ([good, tmp_path / "o.xyz"], "cannot write images with extension"),
        "eps zero": ([good, tmp_path / "o.png", "--eps", "0"], "--eps 0: must be in (0, 64]"),
        "eps too big": ([good, tmp_path / "o.png", "--eps", "65"], "must be in (0, 64]"),
        "unknown model": (
            [good, tmp_path / "o.png", "--model-type", "vit_x"],
            "unknown model type",
        ),
    }


def test_bad_input_gives_one_line_and_writes_nothing(cli, tmp_path):
    for case, (args, message) in bad_inputs(tmp_path).items():
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
        code, out, err = cli(*args, "--quiet")
        assert code != 0, case
        assert len(err.strip().splitlines()) == 1 and message in err, (case, err)
        assert "Traceback" not in err
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before, case


def test_unwritable_destination(cli, tmp_path, monkeypatch):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p).name == "locked" else real_access(p, mode)
    )
    code, _, err = cli(tmp_path / "in.png", tmp_path / "locked" / "o.png", *FAST)
    assert code != 0 and "o.png: cannot write to folder" in err
    assert list((tmp_path / "locked").iterdir()) == []


def test_wrong_checkpoint_is_one_line(cli, tmp_path, tiny_checkpoints):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    code, _, err = cli(tmp_path / "in.png", tmp_path / "o.png", "--quiet", checkpoint="vit_l")
    assert code != 0 and "is a vit_l checkpoint" in err and "not vit_b" in err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    code, _, err = cli(
        tmp_path / "in.png", tmp_path / "o.png", "--quiet", "--checkpoint", junk, checkpoint=None
    )
    assert code != 0 and "junk.pth: not a readable PyTorch checkpoint" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.png").exists()


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "uad.py"),
            str(tmp_path / "missing.png"),
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.png'}: no such file"]


# ------------------------------------------------------------------------------------------
# Every input either gets an output exactly within eps or one line and nothing written, known
# before the model loads where it can be


def early_bad_inputs(tmp_path: Path) -> dict:
    good = tmp_path / "good.png"
    Image.fromarray(small_photo()).save(good)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([small_photo(), small_photo()[..., 0]])).save(rgba)
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    (tmp_path / "images").mkdir()
    Image.fromarray(small_photo()).save(tmp_path / "images" / "a.png")
    grey = tmp_path / "grey.png"
    Image.fromarray(small_photo()[..., 1]).save(grey)
    bright = small_photo()[..., 1].astype(np.float32)
    bright = bright / bright.max() * 1.2  # float, max 1.2
    Image.fromarray(bright).save(tmp_path / "bright.tif")
    bright[3, 5] = np.nan
    Image.fromarray(bright).save(tmp_path / "nan.tif")
    Image.fromarray(small_photo()[..., 1].astype(np.int32) * 1000).save(tmp_path / "int32.tif")
    dark16 = tmp_path / "dark16.png"
    Image.fromarray(small_photo()[..., 1].astype(np.uint16)).save(dark16)
    rgb16 = png_16bit(tmp_path / "rgb16.png", small_photo().astype(np.uint16) * 257)
    os.mkfifo(tmp_path / "fifo.png")
    o = tmp_path / "o.png"
    return {
        "eps as a fraction": ([good, o, "--eps", "0.03"], "--eps 0.03: below one grey level"),
        "unknown impl": ([good, o, "--impl", "foo"], "argument --impl: invalid choice: 'foo'"),
        "device gpu": ([good, o, "--device", "gpu"], "device 'gpu': not a device"),
        "device mps": ([good, o, "--device", "mps"], "device 'mps' requested but MPS"),
        "bad layers": ([good, o, "--layers", "3,x"], "expected comma-separated block indices"),
        "layers too deep": ([good, o, "--layers", "3,8"], "--layers 3,8: vit_b has blocks 0..7"),
        "negative steps": ([good, o, "--steps", "-1"], "--steps -1: must be at least 0"),
        "zero alpha": ([good, o, "--alpha", "0"], "--alpha 0/255: must be above 0"),
        "rgba to jpeg": ([rgba, tmp_path / "o.jpg"], "JPEG cannot store RGB + alpha"),
        "rgb to gif": ([good, tmp_path / "o.gif"], "GIF does not store RGB pixels exactly"),
        "under /proc": ([good, "/proc/o.png"], "cannot write to folder /proc"),
        "bomb": ([tmp_path / "bomb.png", o], "30000x30000 (900 Mpx), over the limit of"),
        "folder to a file name": ([tmp_path / "images", tmp_path / "out.png"], "must be a folder"),
        "missing checkpoint": ([good, o, "--checkpoint", tmp_path / "no.pth"], "no.pth: no such"),
        "too many flows": ([good, o, "--num-flows", "10000"], "--num-flows 10000: must be at most"),
        # runs that would save the input unchanged
        "no PGD steps": ([good, o, "--steps", "0"], "--steps 0: stage 2's PGD steps are what"),
        "no PGD steps, aa": (
            [good, o, "--preset", "aa", "--target-image", good, "--steps", "0"],
            "--steps 0: stage 2's PGD steps are what",
        ),
        "steps under a grey level": (
            [good, o, "--alpha", "0.01", "--steps", "40"],
            "--alpha 0.01/255: 40 steps of it move a pixel at most 0.4/255, under half a grey",
        ),
        # every number finite and in its consumer's range
        "momentum inf": ([good, o, "--momentum", "inf"], "--momentum inf: must be a finite number"),
        "encoder noise inf": (
            [good, o, "--encoder-noise", "inf"],
            "--encoder-noise inf/255: must be a finite number",
        ),
        "init std inf": ([good, o, "--init-std", "inf"], "--init-std inf: must be a finite number"),
        "deform lr inf": ([good, o, "--deform-lr", "inf"], "--deform-lr inf: must be a finite"),
        "lambda tv inf": ([good, o, "--lambda-tv", "inf"], "--lambda-tv inf: must be a finite"),
        "lambda c inf": ([good, o, "--lambda-c", "inf"], "--lambda-c inf: must be a finite number"),
        "alpha inf": ([good, o, "--alpha", "inf"], "--alpha inf/255: must be a finite number"),
        "alpha nan": ([good, o, "--alpha", "nan"], "--alpha nan/255: must be a finite number"),
        "cell size inf": ([good, o, "--cell-size", "inf"], "--cell-size inf: must be a finite"),
        "seed past 64 bits": (
            [good, o, "--seed", str(2**64)],
            f"--seed {2**64}: must be at most {2**64 - 1}",
        ),
        "robust reversed": (
            [good, o, "--robust", "jpeg:50-20"],
            "--robust 'jpeg:50-20': 'jpeg:50-20' is reversed; write jpeg:20-50",
        ),
        "checkpoint /dev/null": (
            [good, o, "--checkpoint", "/dev/null"],
            "/dev/null: not a regular file but a character device",
        ),
        "trailing slash on a file": (
            [good, f"{good}/"],
            f"{good}/: ends in '/', so it names a folder, but {good} is a file",
        ),
        "float above 1": (
            [tmp_path / "bright.tif", o],
            "bright.tif: float image values run from",
        ),
        "float NaN": ([tmp_path / "nan.tif", o], "nan.tif: float image holds NaN"),
        "32-bit above 16": ([tmp_path / "int32.tif", o], "outside the 16-bit range 0..65535"),
        "16-bit rgb at eps 1": (
            [rgb16, o, "--eps", "1"],
            "rgb16.png: PIL reads only the high bytes of this 16-bit file",
        ),
        "16-bit grey to bmp at eps 1": (
            [dark16, tmp_path / "o.bmp", "--eps", "1"],
            "o.bmp: BMP holds no 16-bit grey, so it is written 8-bit, and the rounding takes one",
        ),
        "jpeg without --lossy": (
            [good, tmp_path / "o.jpg"],
            "o.jpg: JPEG is lossy, so the saved file would not be within eps of the input; save "
            "as .png, or pass --lossy",
        ),
        "rgb to pdf": (
            [good, tmp_path / "o.pdf"],
            "PIL writes PDF files but cannot read them back",
        ),
        "rgb to eps": (
            [good, tmp_path / "o.eps"],
            "PIL writes EPS files but cannot read them back",
        ),
        "rgb to pgm": (
            [good, tmp_path / "o.pgm"],
            "a .pgm file holds grey or 16-bit grey images, not RGB",
        ),
        "grey to ppm": ([grey, tmp_path / "o.ppm"], "a .ppm file holds RGB images, not grey"),
        "grey to pbm": ([grey, tmp_path / "o.pbm"], "a .pbm file holds 1-bit pixels"),
        "grey to pfm": (
            [grey, tmp_path / "o.pfm"],
            "a .pfm file holds float grey images, not grey",
        ),
        "fifo": ([tmp_path / "fifo.png", o], "fifo.png: not a regular file (a FIFO)"),
        "preview not png": ([good, o, "--preview", tmp_path / "p.jpg"], "--preview writes PNG"),
        "preview is the input": (
            [good, o, "--preview", good],
            "good.png: --preview would replace an input or output image",
        ),
        "preview exists": ([good, o, "--preview", grey], "grey.png: exists; pass --overwrite"),
        "preview folder is a file": (
            [tmp_path / "images", tmp_path / "out", "--preview", good],
            "--preview of a folder names a folder, and this is a file",
        ),
    }


EARLY_CASES = [
    "eps as a fraction",
    "unknown impl",
    "device gpu",
    "device mps",
    "bad layers",
    "layers too deep",
    "negative steps",
    "zero alpha",
    "rgba to jpeg",
    "rgb to gif",
    "under /proc",
    "bomb",
    "folder to a file name",
    "missing checkpoint",
    "too many flows",
    "no PGD steps",
    "no PGD steps, aa",
    "steps under a grey level",
    "momentum inf",
    "encoder noise inf",
    "init std inf",
    "deform lr inf",
    "lambda tv inf",
    "lambda c inf",
    "alpha inf",
    "alpha nan",
    "cell size inf",
    "seed past 64 bits",
    "robust reversed",
    "checkpoint /dev/null",
    "trailing slash on a file",
    "float above 1",
    "float NaN",
    "32-bit above 16",
    "16-bit rgb at eps 1",
    "16-bit grey to bmp at eps 1",
    "jpeg without --lossy",
    "rgb to pdf",
    "rgb to eps",
    "rgb to pgm",
    "grey to ppm",
    "grey to pbm",
    "grey to pfm",
    "fifo",
    "preview not png",
    "preview is the input",
    "preview exists",
    "preview folder is a file",
]


@pytest.mark.parametrize("case", EARLY_CASES)
def test_bad_input_is_found_before_the_model_loads(cli, tmp_path, no_model, case):
    args, message = early_bad_inputs(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    code, out, err = cli(*args, checkpoint=None)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and "unsegment:" not in err  # no header: no work announced
    assert sorted(tmp_path.rglob("*")) == before


def test_aa_needs_its_target_image_before_the_model_loads(cli, tmp_path, no_model):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    code, _, err = cli(tmp_path / "in.png", tmp_path / "o.png", "--preset", "aa", checkpoint=None)
    assert code != 0 and "--preset aa needs --target-image" in err
    args = ["--preset", "aa", "--target-image", tmp_path / "missing.png"]
    code, _, err = cli(tmp_path / "in.png", tmp_path / "o.png", *args, checkpoint=None)
    assert code != 0 and "missing.png: no such file" in err and not (tmp_path / "o.png").exists()
