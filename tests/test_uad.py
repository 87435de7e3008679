"""uad.py: the attack, the library entry point and the command line, on tiny random-init SAMs."""

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import uad
import unsegment.images
import unsegment.models
import unsegment.progress
from helpers import EXAMPLES, build_tiny_sam, small_photo

ROOT = Path(__file__).resolve().parent.parent
# few steps; the reference preset keeps the encoder out of stage 1 (the paper preset has its own tests)
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


def test_attack_moves_features_further_than_random_noise(tiny_sam):
    image = uad.to_tensor(small_photo())
    config = uad.UADConfig(steps=10, deform_steps=3, proxy_steps=1)
    adv, _, stats = uad.attack(image, tiny_sam, config)
    gen = torch.Generator().manual_seed(0)
    noise = torch.empty(image.shape).uniform_(-config.eps, config.eps, generator=gen)
    noisy = uad.project(image + noise, image, config.eps)
    with torch.no_grad():
        f = lambda x: uad.encoder_features(tiny_sam, x, config.layers)
        random_distance = uad.feature_distance(f(noisy), f(image)).item()
        attack_distance = uad.feature_distance(f(adv), f(image)).item()
    assert attack_distance == pytest.approx(stats.feature_distance[0], rel=1e-4)
    assert attack_distance > 2 * random_distance
    assert (adv - image).abs().max() <= config.eps + 1e-6


def test_reference_preset_runs_no_proxy_loop_and_paper_preset_does(tiny_sam):
    image = uad.to_tensor(small_photo())
    counts = {}
    for preset in ("reference", "paper"):
        config = uad.preset_config(preset, steps=3, deform_steps=2)
        counts[preset] = uad.attack(image, tiny_sam, config)[2]
    # reference: f(I), f(target), then one forward and one backward per PGD step
    assert (counts["reference"].forwards, counts["reference"].backwards) == (2 + 3, 3)
    # paper: per deformation step f(target) + the T_f = 4 proxy steps, each with a backward
    assert (counts["paper"].forwards, counts["paper"].backwards) == (2 + 2 * 5 + 3, 2 * 5 + 3)


def test_fidelity_gradient_reaches_the_flow_and_descends_l_f(tiny_sam):
    # 1024 px long side: SAM's resize (and its rounding) is skipped, so L_F is smooth in the flow
    image = uad.to_tensor(small_photo((1024, 640)))
    config = uad.UADConfig(proxy_steps=1)
    surrogate = uad.Ensemble([uad.Surrogate.of(tiny_sam)], config, uad.Stats())
    with torch.no_grad():
        f_image = surrogate(image)
    gen = torch.Generator().manual_seed(0)
    cells = uad.mosaic_cells(640, 1024, config, "cpu")
    ctrl = (20 * torch.randn(1, 4, 2, 6, 6, generator=gen)).requires_grad_(True)  # 1024-scale px
    proxy = uad.project(image + 0.03 * torch.randn(image.shape, generator=gen), image, config.eps)

    def flow_gradient(lambda_f):
        ctrl.grad = None
        flow = uad.mosaic_flow(ctrl, cells)
        ssim, target = uad.warp_kernel.warp_ssim(image, flow, image)
        loss = ssim + config.lambda_c * uad.flow_regulariser(flow, config)
        c = uad.UADConfig(proxy_steps=1, lambda_f=lambda_f)
        uad.backward_with_fidelity(loss, target, proxy, image, f_image, surrogate, c, gen, None)
        return ctrl.grad.clone()

    g = flow_gradient(1.0) - flow_gradient(0.0)  # the gradient of L_F alone

    def l_f(c):
        with torch.no_grad():
            target = uad.warp_kernel.flow_warp(image, uad.mosaic_flow(c, cells))
            f = lambda x: uad.encoder_features(tiny_sam, x, config.layers)
            return uad.feature_distance(f(proxy), f(target)).item()

    step = 2.0 / g.abs().max().item()  # moves no control point by more than 2 px
    predicted = -(g * g).sum().item() * step
    actual = l_f(ctrl.detach() - step * g) - l_f(ctrl.detach())
    assert predicted < 0 and actual < 0
    assert actual == pytest.approx(predicted, rel=0.3)


def test_flow_regulariser_sees_the_seams_of_the_applied_flow():
    config = uad.UADConfig(num_flows=2)
    cells = uad.mosaic_cells(64, 96, config, "cpu")  # several 28 px cells
    same = torch.full((1, 2, 2, 6, 6), 5.0)  # two uniform fields, equal: one uniform flow
    seams = same.clone()
    seams[:, 1] = -5.0  # each field still uniform (TV 0, variance 0), but they disagree
    flat = uad.flow_regulariser(uad.mosaic_flow(same, cells), config)
    jumps = uad.flow_regulariser(uad.mosaic_flow(seams, cells), config)
    assert flat.item() < 1e-4
    # per field, both mosaics cost nothing; the applied flow's seams cost TV and variance
    whole = torch.ones(1, 1, 1, 64, 96)  # one field owns every pixel
    per_field = [
        uad.flow_regulariser(uad.mosaic_flow(seams[:, k : k + 1], whole), config) for k in (0, 1)
    ]
    assert max(v.item() for v in per_field) < 1e-4
    assert jumps.item() > 1.0


def test_encoder_passes_are_counted_before_the_attack(tiny_sam):
    image = uad.to_tensor(small_photo())
    for preset, d, s, t in [("paper", 2, 3, 4), ("paper", 3, 1, 2), ("no-fidelity", 2, 3, 4)]:
        config = uad.preset_config(
            preset, deform_steps=d, steps=s, **({"proxy_steps": t} if preset == "paper" else {})
        )
        stats = uad.attack(image, tiny_sam, config).stats
        assert (stats.forwards, stats.backwards) == uad.encoder_passes(config), (preset, d, s)
    assert uad.encoder_passes(uad.preset_config("paper")) == (242, 240)
    assert uad.encoder_passes(uad.preset_config("no-fidelity")) == (42, 40)


def test_encoder_features_skip_later_blocks_and_neck(tiny_sam):
    ran = []
    for name in ("7", "neck"):
        module = tiny_sam.image_encoder.blocks[7] if name == "7" else tiny_sam.image_encoder.neck
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
    feats = uad.encoder_features(tiny_sam, uad.to_tensor(small_photo()), (3, 4, 5, 6))
    assert ran == [] and len(feats) == 4 and feats[0].shape == (1, 64, 64, 64)


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"])
def test_preprocessing_matches_sam_predictor(name):
    from segment_anything import SamPredictor

    sam = build_tiny_sam("vit_b")
    seen = {}
    sam.image_encoder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    pixels = unsegment.images.read_image(EXAMPLES / name).pixels
    SamPredictor(sam).set_image(pixels)
    ours = uad.sam_input(uad.to_tensor(pixels), sam)
    grey_levels = ((ours - seen["x"]) * sam.pixel_std).abs()
    # PIL resizes in fixed point: a few pixels land one grey level away from our float resize
    assert grey_levels.max() <= 1 + 1e-3
    assert grey_levels.mean() < 0.25


def test_preprocessing_of_a_grey_image_replicates_it():
    sam = build_tiny_sam("vit_b")
    grey = uad.to_tensor(small_photo()[..., 1])
    rgb = grey.expand(-1, 3, -1, -1)
    assert torch.equal(uad.sam_input(grey, sam), uad.sam_input(rgb, sam))


@pytest.mark.parametrize("seed", range(20))
def test_quantized_output_is_on_the_lattice_and_exactly_within_eps(seed):
    gen = torch.Generator().manual_seed(seed)
    eps = (
        float(torch.randint(1, 65, (), generator=gen))
        / 255
        * float(torch.rand((), generator=gen) + 0.5)
    )
    image = torch.randint(0, 256, (2, 3, 17, 23), generator=gen).float() / 255
    adv = uad.project(image + (torch.rand(image.shape, generator=gen) - 0.5) * 4 * eps, image, eps)
    assert (adv - image).abs().max() <= eps + 1e-7 and adv.min() >= 0 and adv.max() <= 1
    q = uad.quantize(adv, image, eps)
    levels = q * 255
    assert torch.equal(levels, levels.round())
    assert ((levels - image * 255).round().abs() <= int(eps * 255 + 1e-6)).all()
    assert (q - image).abs().max() <= eps + 1e-7


def test_protect_returns_the_kind_it_was_given(tiny_sam):
    config = uad.UADConfig(steps=2, deform_steps=1, proxy_steps=1)
    pixels = small_photo()
    out = uad.protect(pixels, tiny_sam, config=config)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    assert 0 < np.abs(out.astype(int) - pixels).max() <= 8

    rgba = Image.fromarray(
        np.dstack([pixels, np.arange(pixels.size // 3).reshape(pixels.shape[:2]) % 256]).astype(
            np.uint8
        )
    )
    out = uad.protect(rgba, tiny_sam, config=config)
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out)[..., 3], np.asarray(rgba)[..., 3])

    grey = Image.fromarray(pixels[..., 0])
    assert uad.protect(grey, tiny_sam, config=config).mode == "L"

    batch = torch.stack([uad.to_tensor(pixels)[0], uad.to_tensor(pixels[::-1].copy())[0]])
    stats = uad.Stats()
    out = uad.protect(batch, tiny_sam, config=config, stats=stats)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert (out - batch).abs().max() <= config.eps + 1e-6
    assert len(stats.feature_distance) == 2


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


def test_jpeg_output_warns_and_reports_the_decoded_file(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    code, out, err = cli(tmp_path / "in.png", tmp_path / "out.jpg", *FAST[:-1])
    assert code == 0 and "JPEG" in err
    saved = np.asarray(Image.open(tmp_path / "out.jpg"), np.int16)
    linf = np.abs(saved - small_photo()).max()
    assert f"L-inf {linf}/255" in out


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


def test_cli_reports_which_preset_ran(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    args = [tmp_path / "in.png", tmp_path / "out.png", "--steps", "1", "--deform-steps", "1"]
    code, _, err = cli(*args, "--preset", "paper", "--proxy-steps", "1")
    assert code == 0 and "preset paper" in err and "deform 1/1" in err and "simulate 1/1" in err


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


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(uad.UADError, match="o.png: cannot write .No space left"):
        unsegment.images.write_image(tmp_path / "o.png", Image.fromarray(small_photo()))
    assert list(tmp_path.iterdir()) == []


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
# Checkpoints: the official download path, with a local file:// URL standing in for Meta's


def test_missing_checkpoint_is_downloaded_verified_and_cached(
    tiny_archs, tiny_checkpoints, tmp_path, monkeypatch
):
    source = tiny_checkpoints["vit_b"]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setenv("UNSEGMENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(unsegment.models.CHECKPOINT_URLS, "vit_b", (source.as_uri(), digest))
    sam = unsegment.models.load_sam("vit_b", None, "cpu", quiet=True)
    assert sam.image_encoder.pos_embed.shape[-1] == 64
    cached = tmp_path / "cache" / source.name
    assert cached.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cached.parent.iterdir()) == [source.name]


def test_corrupt_download_is_rejected_and_not_kept(
    tiny_archs, tiny_checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setenv("UNSEGMENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        unsegment.models.CHECKPOINT_URLS, "vit_b", (tiny_checkpoints["vit_b"].as_uri(), "0" * 64)
    )
    with pytest.raises(uad.UADError, match="SHA-256 mismatch"):
        unsegment.models.load_sam("vit_b", None, "cpu", quiet=True)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_download_names_the_url_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("UNSEGMENT_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/sam_vit_b_01ec64.pth"  # the discard port: nothing listens
    monkeypatch.setitem(unsegment.models.CHECKPOINT_URLS, "vit_b", (url, "0" * 64))
    with pytest.raises(uad.UADError) as e:
        unsegment.models.load_sam("vit_b", None, "cpu", quiet=True)
    assert url in str(e.value) and "--checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert f"download it by hand to {tmp_path / 'cache' / 'sam_vit_b_01ec64.pth'}" in str(e.value)


def test_bfloat16_autocast_moves_features_like_float32(tiny_sam):
    image = uad.to_tensor(small_photo())
    distances = {}
    for dtype in ("float32", "bfloat16"):
        config = uad.UADConfig(steps=6, deform_steps=1, proxy_steps=1, dtype=dtype)
        adv, _, stats = uad.attack(image, tiny_sam, config)
        assert adv.dtype == torch.float32 and (adv - image).abs().max() <= config.eps + 1e-6
        distances[dtype] = stats.feature_distance[0]
    noise = torch.empty(image.shape).uniform_(-8 / 255, 8 / 255, generator=torch.Generator())
    with torch.no_grad():
        f = lambda x: uad.encoder_features(tiny_sam, x, (3, 4, 5, 6))
        random = uad.feature_distance(f(uad.project(image + noise, image, 8 / 255)), f(image))
    assert distances["bfloat16"] > 2 * random.item()
    assert 0.5 < distances["bfloat16"] / distances["float32"] < 2


def test_layers_beyond_the_encoder_are_an_error(tiny_sam):
    with pytest.raises(uad.UADError, match="blocks 0..7"):
        uad.attack(uad.to_tensor(small_photo()), tiny_sam, uad.UADConfig(layers=(3, 8)))


# ------------------------------------------------------------------------------------------
# Every input either gets an output exactly within eps or one line and nothing written, known
# before the model loads where it can be


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )


def early_bad_inputs(tmp_path: Path) -> dict:
    good = tmp_path / "good.png"
    Image.fromarray(small_photo()).save(good)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([small_photo(), small_photo()[..., 0]])).save(rgba)
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    (tmp_path / "images").mkdir()
    Image.fromarray(small_photo()).save(tmp_path / "images" / "a.png")
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


def test_bomb_limit_names_the_flag_that_raises_it(tmp_path):
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(uad.UADError, match=r"pass --max-pixels 900000000 to process it"):
        unsegment.images.read_image(tmp_path / "bomb.png")


def test_corrupt_checkpoints_are_one_short_line(tiny_archs, tiny_checkpoints, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoints["vit_b"].read_bytes()[:5000])
    for path, reason in [(text, "not a PyTorch file"), (truncated, "truncated or corrupt")]:
        with pytest.raises(uad.UADError) as e:
            unsegment.models.load_sam("vit_b", path)
        message = str(e.value)
        assert message == f"{path}: not a readable PyTorch checkpoint ({reason})"


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
    assert 0 < linf <= 8 or (fmt == "JPEG" and linf > 0), (fmt, linf)


def test_the_formats_people_use_are_written_and_gif_is_refused(cli, tmp_path):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    for ext in (".png", ".tif", ".webp", ".bmp", ".jpg"):
        assert cli(tmp_path / "in.png", tmp_path / f"o{ext}", *FAST)[0] == 0, ext
    webp = unsegment.images.read_image(tmp_path / "o.webp").pixels.astype(int)
    assert np.abs(webp - small_photo()).max() <= 8  # lossless WebP: exactly within eps
    assert cli(tmp_path / "in.png", tmp_path / "o.gif", *FAST)[0] != 0


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


def test_folder_with_one_image_into_a_new_folder(cli, tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(small_photo()).save(tmp_path / "in" / "only.png")
    code, out, err = cli(tmp_path / "in", tmp_path / "new" / "out", *FAST)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "new" / "out").iterdir()] == ["only.png"]


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


def test_icc_profile_of_another_colour_space_is_not_carried():
    rgb_profile = b"\0" * 16 + b"RGB " + b"\0" * 108
    cmyk_profile = b"\0" * 16 + b"CMYK" + b"\0" * 108
    assert uad.matching_profile(rgb_profile, "RGB") == rgb_profile
    assert uad.matching_profile(rgb_profile, "L") is None
    assert uad.matching_profile(cmyk_profile, "RGB") is None


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


def test_identical_features_report_a_distance_of_zero_not_below(tiny_sam):
    image = uad.to_tensor(small_photo())
    stats = uad.attack(image, tiny_sam, uad.UADConfig(steps=0, deform_steps=0)).stats
    assert stats.feature_distance == [0.0]


# ------------------------------------------------------------------------------------------
# Baselines: aa (towards another image's features) and noise


def test_aa_moves_features_towards_the_other_image_more_than_noise(tiny_sam):
    image = uad.to_tensor(small_photo())
    other = uad.to_tensor(small_photo((80, 80))[::-1].copy())
    f = lambda x: uad.encoder_features(tiny_sam, x, (3, 4, 5, 6))
    towards = {}
    for preset in ("aa", "noise"):
        config = uad.preset_config(preset, steps=8, seed=3)
        result = uad.attack(image, tiny_sam, config, target_image=other if preset == "aa" else None)
        assert (result.adv - image).abs().max() <= config.eps + 1e-6
        assert (result.stats.forwards, result.stats.backwards) == uad.encoder_passes(config)
        with torch.no_grad():
            towards[preset] = uad.feature_distance(f(result.adv), f(other)).item()
    with torch.no_grad():
        start = uad.feature_distance(f(image), f(other)).item()
    assert towards["aa"] < 0.9 * start and towards["aa"] < towards["noise"]


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


def test_aa_needs_its_target_image_before_the_model_loads(cli, tmp_path, no_model):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    code, _, err = cli(tmp_path / "in.png", tmp_path / "o.png", "--preset", "aa", checkpoint=None)
    assert code != 0 and "--preset aa needs --target-image" in err
    args = ["--preset", "aa", "--target-image", tmp_path / "missing.png"]
    code, _, err = cli(tmp_path / "in.png", tmp_path / "o.png", *args, checkpoint=None)
    assert code != 0 and "missing.png: no such file" in err and not (tmp_path / "o.png").exists()


def test_an_unreadable_file_says_so(tmp_path, monkeypatch):
    Image.fromarray(small_photo()).save(tmp_path / "locked.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(uad.Image, "open", denied)
    with pytest.raises(uad.UADError, match="locked.png: cannot be read .Permission denied."):
        unsegment.images.read_image(tmp_path / "locked.png")
