"""eval.py: RLE decoding, prompts, metrics, and the command line on tiny random-init SAMs."""

import argparse
import csv
import io
import json
import re
import subprocess
import sys
import time
import types
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval as ev
import uad
import unsegment.models
import unsegment.probes
import unsegment.progress
import unsegment.report
from helpers import (
    EXAMPLES,
    ROOT,
    annotation,
    encode_runs,
    encode_string,
    noisy,
    parse_table,
    save,
    small_photo,
    two_objects,
    write_annotations,
    write_authors_log,
)

# few prompts and a 3x3 generator grid keep one scored image to a few seconds on one core
FAST = ["--points", "2", "--boxes", "1", "--max-masks", "2", "--quiet"]
OPEN_GENERATOR = "--points-per-side 3 --pred-iou-thresh 0 --stability-score-thresh 0".split()


# -----------------------------------------------------------------------------------------------
# helpers: images, running the CLI (the COCO RLE encoder and the annotations are in helpers.py)


def photo(name: str, size=(96, 64)) -> np.ndarray:
    with Image.open(EXAMPLES / name) as im:
        return np.array(im.convert("RGB").resize(size, Image.BILINEAR))


@pytest.fixture
def cli(tiny_archs, capsys):
    """Runs `eval.py ARGS` in-process; returns (exit code, stdout, stderr)."""

    def run(*args):
        try:
            code = ev.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_script(*args):
    """eval.py as a subprocess, for the errors that come before any model is loaded."""
    cmd = [sys.executable, str(ROOT / "eval.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def models(checkpoints, *names):
    return ",".join(f"{n}={checkpoints[n]}" for n in names)


# -----------------------------------------------------------------------------------------------
# COCO RLE


def test_decode_rle_hand_computed_string():
    # runs 0, 5, 40, 3, 2 over a 5 x 10 image: "0", "5", 40 = "X1" (8 + 1 << 5, 0x20 = more),
    # then differences to the run two back: 3 - 5 = -2 -> "N", 2 - 40 = -38 -> "jN"
    mask = ev.decode_rle({"size": [5, 10], "counts": "05X1NjN"})
    want = np.zeros((5, 10), bool)
    want[:, 0] = True  # the 5 foreground pixels after 0 background: the whole first column
    want[0:3, 9] = True  # 40 background (columns 1-8), then 3 foreground at the top of column 9
    np.testing.assert_array_equal(mask, want)
    assert encode_string([0, 5, 40, 3, 2]) == "05X1NjN"


def test_decode_rle_matches_a_string_written_by_pycocotools():
    # pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"] for this mask;
    # pycocotools.mask.toBbox gave [5, 3, 53, 36]
    counts = (
        "[6R16000007POi0000000000000000000000000000000000000000000000000000000000000"
        "0ROa03_OMa03_OMa03_OMa03_OMa03_OM3I8:EMa03_OMa03_OMa03_OMa0=000000000000000l1"
    )
    mask = np.zeros((40, 60), bool)
    mask[3:37, 5:9] = True
    mask[10:12, 9:50] = True
    mask[20:39, 40:58] = True
    mask[25, 45] = False
    np.testing.assert_array_equal(ev.decode_rle({"size": [40, 60], "counts": counts}), mask)
    assert ev.mask_bbox(mask) == (5, 3, 53, 36)
    assert ev.encode_rle(mask) == {"size": [40, 60], "counts": counts}  # and written back


def test_encode_rle_round_trips_through_decode_rle():
    rng = np.random.default_rng(1)
    masks = [rng.random((h, w)) < p for h, w, p in [(7, 9, 0.5), (1, 1, 1.0), (13, 5, 0.1)]]
    big = np.zeros((1500, 2250), bool)
    big[100:1400, 300:2000] = True
    for mask in [*masks, np.zeros((4, 6), bool), np.ones((6, 4), bool), big]:
        rle = ev.encode_rle(mask)
        assert rle["counts"] == encode_string(encode_runs(mask))  # the tests' own encoder agrees
        np.testing.assert_array_equal(ev.decode_rle(rle), mask)


def test_decode_rle_round_trips_compressed_and_uncompressed():
    rng = np.random.default_rng(0)
    masks = [rng.random((h, w)) < p for h, w, p in [(7, 9, 0.5), (1, 1, 1.0), (13, 5, 0.1)]]
    masks += [np.zeros((4, 6), bool), np.ones((6, 4), bool)]
    big = np.zeros((1500, 2250), bool)  # SA-1B size: runs far beyond one 5-bit group
    big[100:1400, 300:2000] = True
    big[700:720] = False
    masks.append(big)
    for mask in masks:
        runs = encode_runs(mask)
        for counts in (encode_string(runs), encode_string(runs).encode(), runs):
            decoded = ev.decode_rle({"size": list(mask.shape), "counts": counts})
            assert decoded.dtype == bool and decoded.shape == mask.shape
            np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ({"size": [2, 2], "counts": [1, 2]}, "add up to 3 pixels"),
        ({"size": [2, 2], "counts": [5, -1]}, "add up"),
        ({"size": [2, 2], "counts": "X"}, "ends inside a number"),
        ({"size": [2, 2], "counts": "1~1"}, "cannot occur"),
        ({"size": [2, 2], "counts": 4}, "string or a list"),
        ([[0, 0, 1, 0, 1, 1]], "polygons"),
    ],
)
def test_decode_rle_rejects_malformed_input(segmentation, message):
    with pytest.raises(ValueError, match=message):
        ev.decode_rle(segmentation)


def test_read_annotations_keeps_the_first_masks_and_skips_empty_ones(tmp_path):
    rect, ell = two_objects()
    empty = np.zeros_like(rect)
    path = write_annotations(tmp_path / "a.json", [rect, empty, ell, rect])
    objects = ev.read_annotations(path, rect.shape, max_masks=3)
    assert len(objects) == 2  # the first 3 annotations, the empty one skipped
    np.testing.assert_array_equal(objects[0].mask, rect)
    np.testing.assert_array_equal(objects[1].mask, ell)
    assert objects[0].bbox == (20, 10, 40, 30)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such annotation file"),
        ("{not json", "not valid JSON"),
        ('{"images": []}', "no 'annotations' list"),
        ({"annotations": [{"segmentation": {"size": [64, 96], "counts": [6144]}}]}, "no 'bbox'"),
        (
            {"annotations": [{"segmentation": {"size": [6, 9], "counts": [54]}, "bbox": [0] * 4}]},
            "annotation 0 is 9x6, the clean image 96x64",
        ),
        (
            {"annotations": [{"segmentation": {"size": [64, 96], "counts": [6144]}, "bbox": [0]}]},
            "bbox has 1 numbers, not 4",
        ),
        (
            {
                "annotations": [
                    {
                        "segmentation": {"size": [64, 96], "counts": [6144]},
                        "bbox": [0, 0, float("nan"), 5],
                    }
                ]
            },
            r"bbox \[0.0, 0.0, nan, 5.0\] is not finite",
        ),
        (  # a few bytes that declare 10 gigapixels: refused before anything is allocated
            {
                "annotations": [
                    {"segmentation": {"size": [10**5] * 2, "counts": [10**10]}, "bbox": [0] * 4}
                ]
            },
            "annotation 0 is 100000x100000, the clean image 96x64",
        ),
        (
            {
                "annotations": [
                    {"segmentation": {"size": [64, 96], "counts": [10**30]}, "bbox": [0] * 4}
                ]
            },
            "annotation 0: ",
        ),
        ("folder", "is a folder, not a JSON file"),
    ],
)
def test_read_annotations_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "sa_1.json"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(uad.UADError, match=message) as e:
        ev.read_annotations(path, (64, 96), 10)
    assert str(e.value).startswith(str(path))


def test_unreadable_annotation_file_is_one_line(tmp_path, monkeypatch):
    path = write_annotations(tmp_path / "sa_1.json", [two_objects()[0]])
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):  # as root, chmod 000 would not stop the read
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(uad.UADError, match=f"^{path}: cannot read .Permission denied.$"):
        ev.read_annotations(path, (64, 96), 10)


# -----------------------------------------------------------------------------------------------
# Prompts


def test_prompts_are_a_function_of_seed_and_name_only():
    rect, ell = two_objects()
    objects = [ev.RefObject(m, ev.mask_bbox(m)) for m in (rect, ell)]
    first = ev.sample_prompts(objects, "sa_1", 0, 5, 3)
    assert first == ev.sample_prompts(objects, "sa_1", 0, 5, 3)
    assert first != ev.sample_prompts(objects, "sa_2", 0, 5, 3)
    assert first != ev.sample_prompts(objects, "sa_1", 1, 5, 3)
    assert [p.kind for p in first] == ["point"] * 5 + ["box"] * 3 + ["point"] * 5 + ["box"] * 3
    # points and boxes draw from separate streams: fewer points leave the boxes unchanged
    fewer = ev.sample_prompts(objects, "sa_1", 0, 2, 3)
    assert [p for p in fewer if p.kind == "box"] == [p for p in first if p.kind == "box"]


def test_points_are_distinct_pixels_inside_the_mask():
    rect, _ = two_objects()
    points = ev.sample_points(rect, 50, np.random.default_rng(0))
    assert points.shape == (50, 2)
    assert rect[points[:, 1], points[:, 0]].all()  # (x, y) order
    assert len({tuple(p) for p in points}) == 50
    three = np.zeros((5, 5), bool)
    three[1, 1] = three[2, 3] = three[4, 0] = True
    got = ev.sample_points(three, 5, np.random.default_rng(0))
    assert sorted(map(tuple, got)) == [(0, 4), (1, 1), (3, 2)]  # all of them, once


def test_points_are_uniform_over_the_mask():
    mask = np.zeros((6, 6), bool)
    mask[[0, 2, 5, 5], [1, 4, 0, 5]] = True
    counts = {}
    for seed in range(4000):
        ((x, y),) = ev.sample_points(mask, 1, np.random.default_rng(seed))
        counts[(x, y)] = counts.get((x, y), 0) + 1
    assert set(counts) == {(1, 0), (4, 2), (0, 5), (5, 5)}
    assert all(abs(c - 1000) < 120 for c in counts.values()), counts  # ~4 standard deviations


def test_box_jitter_keeps_the_centre_and_draws_whole_pixel_sizes():
    bbox = (10, 20, 100, 50)  # x, y, w, h: centre (60, 45)
    rng = np.random.default_rng(7)
    bw, bh = int(rng.integers(90, 110)), int(rng.integers(45, 55))  # the draws, width first
    want = [int(60 - bw / 2), int(45 - bh / 2), int(60 + bw / 2), int(45 + bh / 2)]
    np.testing.assert_array_equal(
        ev.jitter_boxes(bbox, 1, (100, 200), np.random.default_rng(7)), [want]
    )
    boxes = ev.jitter_boxes(bbox, 500, (100, 200), np.random.default_rng(0))
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert widths.min() >= 89 and widths.max() <= 110
    assert heights.min() >= 44 and heights.max() <= 55
    assert np.abs((boxes[:, 0] + boxes[:, 2]) / 2 - 60).max() <= 1
    assert np.abs((boxes[:, 1] + boxes[:, 3]) / 2 - 45).max() <= 1
    assert widths.max() - widths.min() >= 18  # the whole [0.9, 1.1) range is drawn


def test_box_jitter_is_clipped_to_the_image_and_survives_tiny_boxes():
    boxes = ev.jitter_boxes((150, 0, 50, 100), 50, (100, 200), np.random.default_rng(0))
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert boxes[:, 2].max() <= 199 and boxes[:, 3].max() <= 99
    assert (boxes[:, 2] == 199).any() and (boxes[:, 3] == 99).any()
    # 0.9 * 1.5 and 1.1 * 1.5 truncate to the same pixel: the range is empty, the size is kept
    assert ev.jitter_length(1.5, np.random.default_rng(0)) == 1


# -----------------------------------------------------------------------------------------------
# Metrics


def test_iou_on_hand_made_masks():
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[0:4, 0:4] = True
    b[2:6, 0:4] = True  # overlap 2 x 4 = 8 pixels, union 16 + 16 - 8 = 24
    assert ev.mask_iou(a, b) == pytest.approx(100 * 8 / 24)
    assert ev.mask_iou(a, a) == 100.0
    empty = np.zeros_like(a)
    assert ev.mask_iou(empty, empty) == 100.0  # both empty: the masks agree
    assert ev.mask_iou(a, empty) == 0.0 and ev.mask_iou(empty, a) == 0.0


def test_asr_counts_strictly_below_the_threshold():
    m = ev.summarise_ious([100, 50, 49.99, 10, 9.5, 0])
    assert m.count == 6
    assert m.miou == pytest.approx((100 + 50 + 49.99 + 10 + 9.5) / 6)
    assert m.asr50 == pytest.approx(100 * 4 / 6)  # 49.99, 10, 9.5, 0; 50 itself is not
    assert m.asr10 == pytest.approx(100 * 2 / 6)  # 9.5, 0
    assert ev.summarise_ious([]) == ev.Metrics(miou=None, asr50=None, asr10=None, count=0)


def test_image_quality_figures():
    clean = np.full((32, 48, 3), 100, np.uint8)
    same = ev.measure_quality(clean, clean.copy())
    assert same.linf == 0 and same.psnr is None and same.ssim == pytest.approx(1, abs=1e-5)
    shifted = clean + 8
    q = ev.measure_quality(clean, shifted)
    assert q.linf == 8
    assert q.psnr == pytest.approx(10 * np.log10(255**2 / 64))
    assert q.ssim < 1


def test_probes_keep_the_size_and_change_the_pixels():
    pixels = small_photo((96, 64))
    assert unsegment.probes.apply_probe(pixels, "none") is pixels
    probes = "jpeg:30,resize:0.5,blur:1,median:3,noise:4,bits:3,resize:0.5+jpeg:30,jpeg:30+blur:2"
    outputs = {}
    for probe in unsegment.probes.parse_probes(probes):
        out = unsegment.probes.apply_probe(pixels, probe, seed=0, key="cat")
        assert out.shape == pixels.shape and out.dtype == np.uint8
        assert 0 < np.abs(out.astype(int) - pixels).max() < 255, probe
        outputs[probe] = out
    # a combination is its steps in order, back to the original size at the end
    small = Image.fromarray(pixels).resize((48, 32), Image.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=30)
    want = np.asarray(Image.open(buf).convert("RGB").resize((96, 64), Image.BICUBIC))
    np.testing.assert_array_equal(outputs["resize:0.5+jpeg:30"], want)
    blurred = unsegment.probes.apply_probe(outputs["jpeg:30"], "blur:2")
    np.testing.assert_array_equal(outputs["jpeg:30+blur:2"], blurred)
    # bits: every value on the 2^N-level lattice; median: an outlier pixel is removed
    assert set(np.unique(outputs["bits:3"])) <= {round(k * 255 / 7) for k in range(8)}
    spot = np.full((9, 9, 3), 100, np.uint8)
    spot[4, 4] = 255
    assert (unsegment.probes.apply_probe(spot, "median:3") == 100).all()


@pytest.mark.parametrize(
    "text, message",
    [
        ("jpeg:0", "jpeg takes 1..100 (quality), not 0"),
        ("median:4", "median takes odd, 3..15"),
        ("blur:-1", "blur takes (0, 20] (sigma in pixels)"),
        ("noise:x", "noise takes a number (std in 1/255), not 'x'"),
        ("bits:9", "bits takes 1..8 (bits per channel)"),
        ("sharpen:2", "'sharpen:2' is not none, jpeg:N, resize:S"),
        ("blur:1,blur:1.0", "blur:1 is listed twice"),
        (",", "no probe"),
    ],
)
def test_bad_probes_name_the_problem(text, message):
    with pytest.raises(uad.UADError, match=re.escape(message)):
        unsegment.probes.parse_probes(text)


def test_clean_reference_objects_largest_first_with_an_unfiltered_fallback():
    sizes = [3, 0, 20, 7, 12]  # areas of the generator's masks, one empty

    def mask(n):
        m = np.zeros((10, 10), bool)
        m.flat[:n] = True
        return m

    class Generator:
        def __init__(self, **settings):
            self.settings = settings

        def generate(self, image):
            if self.settings["pred_iou_thresh"] > 0:  # nothing passes the thresholds
                return []
            return [{"segmentation": mask(n), "area": n} for n in sizes]

    seg = ev.Segmenter("fake", lambda: None, Generator)
    args = types.SimpleNamespace(
        points_per_side=4, pred_iou_thresh=0.88, stability_score_thresh=0.95, max_masks=3
    )
    objects, how = ev.find_objects(seg, np.zeros((10, 10, 3), np.uint8), args)
    assert how == "automatic, unfiltered"
    assert [int(o.mask.sum()) for o in objects] == [20, 12, 7]
    assert objects[0].bbox == ev.mask_bbox(mask(20))
    sizes[:] = [0]
    with pytest.raises(uad.UADError, match="found no object"):
        ev.find_objects(seg, np.zeros((10, 10, 3), np.uint8), args)


# -----------------------------------------------------------------------------------------------
# End to end, clean-reference mode


def test_clean_reference_mode_self_scores_100_and_noise_scores_lower(
    cli, tiny_checkpoints, tmp_path
):
    cat, coffee = small_photo((96, 64)), photo("coffee.png")
    save(tmp_path / "clean/same.png", cat)
    save(tmp_path / "adv/same.png", cat)
    save(tmp_path / "clean/noisy.png", coffee)
    save(tmp_path / "adv/noisy.png", noisy(coffee, 80))
    out, table_csv = tmp_path / "r.json", tmp_path / "r.csv"
    pair = ["--clean", tmp_path / "clean", "--adv", tmp_path / "adv"]
    outputs = ["--out", out, "--csv", table_csv]
    loud = [a for a in FAST if a != "--quiet"]
    code, stdout, stderr = cli(
        *pair, *outputs, "--models", models(tiny_checkpoints, "vit_b"), *loud, *OPEN_GENERATOR
    )
    assert code == 0, stderr
    # a progress line per image (stderr is not a terminal here), with its pace and ETA
    lines = stderr.splitlines()
    assert lines[0] == "[1/2] noisy.png"
    assert re.fullmatch(r"\[2/2\] same\.png  \d+\.\d s/image, ETA 0:\d\d", lines[1]), lines
    result = json.loads(out.read_text())
    assert result["mode"] == "clean-reference" and result["failures"] == []
    rows = {r["name"]: r for r in result["images"]}
    same, moved = rows["same.png"]["metrics"]["vit_b"], rows["noisy.png"]["metrics"]["vit_b"]
    for kind in ("point", "box", "all"):
        assert same[kind]["miou"] == 100 and same[kind]["asr50"] == 0 and same[kind]["asr10"] == 0
    assert moved["all"]["miou"] < 100
    assert rows["same.png"]["linf"] == 0 and rows["same.png"]["psnr"] is None
    assert rows["noisy.png"]["linf"] > 100 and rows["noisy.png"]["ssim"] < 0.5
    for r in rows.values():
        assert 1 <= r["objects"] <= 2  # --max-masks 2
        kinds = [p["kind"] for p in r["prompts"]]
        assert kinds.count("box") == r["objects"] and kinds.count("point") <= 2 * r["objects"]
        assert r["metrics"]["vit_b"]["all"]["count"] == len(kinds)
        assert r["reference"] == "automatic"

    # the summary pools every prompt of both images
    ious = [p["iou"]["vit_b"] for r in result["images"] for p in r["prompts"]]
    assert result["summary"]["vit_b"]["all"]["miou"] == pytest.approx(np.mean(ious))
    assert result["summary"]["vit_b"]["all"]["count"] == len(ious)

    # the printed table, the JSON and the CSV agree
    table = parse_table(stdout)
    rows_csv = list(csv.DictReader(io.StringIO(table_csv.read_text())))
    for kind, m in result["summary"]["vit_b"].items():
        count, miou, asr50, asr10 = table[("vit_b", kind)]
        assert count == m["count"]
        assert (miou, asr50, asr10) == tuple(round(m[k], 2) for k in ("miou", "asr50", "asr10"))
        line = next(r for r in rows_csv if (r["image"], r["prompts"]) == ("ALL", kind))
        assert float(line["miou"]) == pytest.approx(m["miou"]) and int(line["count"]) == m["count"]
    for r in result["images"]:
        for kind, m in r["metrics"]["vit_b"].items():
            line = next(x for x in rows_csv if (x["image"], x["prompts"]) == (r["name"], kind))
            assert float(line["asr50"]) == pytest.approx(m["asr50"])
    assert len(rows_csv) == 3 * 3  # two images and ALL, three prompt types, one model


def test_the_pace_on_the_progress_line_leaves_out_model_loading(
    cli, tiny_checkpoints, tmp_path, monkeypatch
):
    class Clock:  # time as unsegment.progress.Progress sees it, in which loading a model takes 1000 s
        offset = 0.0

        def monotonic(self):
            return time.monotonic() + self.offset

        def __getattr__(self, name):
            return getattr(time, name)

    clock, load = Clock(), ev.load_segmenter

    def slow_load(*args, **kwargs):
        clock.offset += 1000
        return load(*args, **kwargs)

    monkeypatch.setattr(unsegment.progress, "time", clock)
    monkeypatch.setattr(ev, "load_segmenter", slow_load)
    cat = small_photo((96, 64))
    for name in ("a", "b"):
        save(tmp_path / "clean" / f"{name}.png", cat)
        save(tmp_path / "adv" / f"{name}.png", cat)
    pair = ["--clean", tmp_path / "clean", "--adv", tmp_path / "adv"]
    loud = [a for a in FAST if a != "--quiet"]
    code, _, stderr = cli(
        *pair, "--models", models(tiny_checkpoints, "vit_b"), *loud, *OPEN_GENERATOR
    )
    assert code == 0, stderr
    pace = re.fullmatch(r"\[2/2\] b\.png  (\d+\.\d) s/image, ETA \d+:\d\d", stderr.splitlines()[1])
    assert pace and float(pace.group(1)) < 500, stderr  # the first image's scoring, without the
    # 1000 s of loading (a first use of warp_kernel may compile it: seconds, not hundreds)


# -----------------------------------------------------------------------------------------------
# End to end, annotation (SA-1B) mode


def test_annotation_mode_on_a_hand_made_sa1b_json(cli, tiny_checkpoints, tmp_path):
    cat = small_photo((96, 64))
    clean, adv = save(tmp_path / "sa_1.png", cat), save(tmp_path / "adv.png", cat)
    rect, ell = two_objects()
    json_path = tmp_path / "ann" / "sa_1.json"
    json_path.parent.mkdir()
    anns = [annotation(rect), annotation(np.zeros_like(rect)), annotation(ell, compressed=False)]
    json_path.write_text(json.dumps({"annotations": anns}))
    out = tmp_path / "r.json"
    pair = ["--clean", clean, "--adv", adv, "--annotations", tmp_path / "ann", "--out", out]
    # --max-masks 3: the empty mask counts among the first 3 annotations, and is skipped
    code, stdout, stderr = cli(
        *pair, "--models", models(tiny_checkpoints, "vit_b", "vit_l"), *FAST, "--max-masks", "3"
    )
    assert code == 0, stderr
    assert "clean mIoU" in stdout
    result = json.loads(out.read_text())
    (row,) = result["images"]
    assert result["mode"] == row["reference"] == "annotations"
    assert row["objects"] == 2
    masks = [rect, ell]
    for p in row["prompts"]:
        m = masks[p["object"]]
        if p["kind"] == "point":
            assert m[p["coords"][1], p["coords"][0]]
        else:
            x, y, w, h = ev.mask_bbox(m)
            assert abs((p["coords"][0] + p["coords"][2]) / 2 - (x + w / 2)) <= 1
        # the adversarial image is the clean one: its IoU against the truth is the clean one's
        assert p["iou"] == p["clean_iou"] and set(p["iou"]) == {"vit_b", "vit_l"}
    for name in ("vit_b", "vit_l"):
        for kind, m in result["summary"][name].items():
            assert m["miou"] == pytest.approx(m["clean_miou"])
            assert m["count"] == {"point": 4, "box": 2, "all": 6}[kind]
    # two models with different weights do not predict the same masks
    ious = {name: [p["iou"][name] for p in row["prompts"]] for name in ("vit_b", "vit_l")}
    assert ious["vit_b"] != ious["vit_l"]


def scores(metrics: dict) -> dict:
    """A JSON's {model: {prompt type: Metrics}} without the clean image's mIoU."""
    return {
        model: {
            kind: {k: v for k, v in m.items() if k != "clean_miou"} for kind, m in kinds.items()
        }
        for model, kinds in metrics.items()
    }


def test_probes_degrade_the_adversarial_image_before_scoring(cli, tiny_checkpoints, tmp_path):
    cat = small_photo((96, 64))
    clean, adv = save(tmp_path / "cat.png", cat), save(tmp_path / "adv.png", cat)
    rect, _ = two_objects()
    ann = write_annotations(tmp_path / "cat.json", [rect])
    out = tmp_path / "r.json"
    pair = ["--clean", clean, "--adv", adv, "--annotations", ann, "--out", out]
    probes = ["--jpeg", 20, "--resize", 0.5]
    loud = [a for a in FAST if a != "--quiet"]
    code, _, stderr = cli(*pair, *probes, "--models", models(tiny_checkpoints, "vit_b"), *loud)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    (row,) = result["images"]
    assert row["linf"] > 10 and row["psnr"] is not None and row["ssim"] < 1
    assert result["settings"]["jpeg"] == 20 and result["settings"]["resize"] == 0.5
    assert result["settings"]["probes"] == ["resize:0.5+jpeg:20"]  # the shorthand's probe
    assert row["metrics"]["vit_b"]["all"]["count"] == 3
    assert scores(row["probes"]["resize:0.5+jpeg:20"]["adv"]) == scores(row["metrics"])
    # without --quiet, a progress line naming the image (stderr is not a terminal here)
    assert "cat.png" in stderr.splitlines()


def test_every_probe_is_scored_on_both_images_with_the_same_noise(cli, tiny_checkpoints, tmp_path):
    cat = small_photo((96, 64))
    clean, adv = save(tmp_path / "cat.png", cat), save(tmp_path / "adv.png", noisy(cat, 6))
    rect, ell = two_objects()
    ann = write_annotations(tmp_path / "cat.json", [rect, ell])
    out = tmp_path / "r.json"
    probes = "none,jpeg:50,blur:1,median:3,noise:4,bits:3,resize:0.5+jpeg:75"
    pair = ["--clean", clean, "--adv", adv, "--annotations", ann, "--out", out]
    code, stdout, stderr = cli(
        *pair, "--probes", probes, "--models", models(tiny_checkpoints, "vit_b"), *FAST
    )
    assert code == 0, stderr
    result = json.loads(out.read_text())
    names = probes.split(",")
    assert list(result["probes"]) == names and result["settings"]["probes"] == names
    (row,) = result["images"]
    assert list(row["probes"]) == names
    # the first probe's scores are the row's own; the clean image through none is the clean one
    assert scores(row["probes"]["none"]["adv"]) == scores(row["metrics"])
    assert row["probes"]["none"]["linf"] == row["linf"] > 0
    for p in row["prompts"]:
        assert p["probes"]["none"]["adv"] == p["iou"]
        assert p["probes"]["none"]["clean"] == p["clean_iou"]
    # the pooled summary of each probe is the mean over its prompts
    for name in names:
        for side in ("adv", "clean"):
            ious = [p["probes"][name][side]["vit_b"] for p in row["prompts"]]
            pooled = result["probes"][name][side]["vit_b"]["all"]
            assert pooled["miou"] == pytest.approx(np.mean(ious)) and pooled["count"] == len(ious)
        assert result["probes"][name]["quality"]["linf_max"] == row["probes"][name]["linf"]
    # the printed probe table has every probe, model and prompt type
    lines = stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("probe ")))
    probe_rows = [line.split() for line in lines[head + 1 :]]
    assert [(r[0], r[2]) for r in probe_rows] == [(n, k) for n in names for k in KINDS]
    noise = result["probes"]["noise:4"]["adv"]["vit_b"]["all"]
    assert [float(v) for v in probe_rows[3 * names.index("noise:4") + 2][3:5]] == [
        round(noise["miou"], 2),
        round(noise["asr50"], 2),
    ]

    # the protected image scored as the clean one: through each probe, noise included, both
    # images become the same, so every probe scores them alike
    save(adv, cat)
    code, _, stderr = cli(
        *pair, "--probes", probes, "--models", models(tiny_checkpoints, "vit_b"), *FAST
    )
    assert code == 0, stderr
    result = json.loads(out.read_text())
    for name in names:
        assert result["probes"][name]["adv"] == result["probes"][name]["clean"], name
        assert (result["probes"][name]["quality"]["linf_max"] > 0) == (name != "none")


KINDS = ("point", "box", "all")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--probes", "median:4"], "median takes odd, 3..15"),
        (["--probes", "none", "--jpeg", "50"], "--jpeg and --resize are shorthands"),
        (["--report-objects", "0"], "argument --report-objects: 0: must be at least 1"),
    ],
)
def test_bad_probe_and_report_flags_are_one_line(cli, tiny_checkpoints, tmp_path, flags, message):
    cat = save(tmp_path / "cat.png", small_photo())
    code, stdout, stderr = cli("--clean", cat, "--adv", cat, "--models", "vit_b", *flags)
    assert code == 2 and stdout == "" and message in stderr and len(stderr.splitlines()) == 1


# -----------------------------------------------------------------------------------------------
# --report


def test_a_mask_drawn_covers_exactly_the_predicted_pixels(tiny_sam, tmp_path):
    from segment_anything import SamPredictor

    cat = small_photo((96, 64)) // 2  # values 0..127: none is within a grey level of the colour
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(cat)
    mask = ev.predict_mask(predictor, ev.Prompt(0, "box", (10, 8, 70, 50)))
    assert 0 < mask.sum() < mask.size
    colour = (230, 25, 175)
    picture = unsegment.report.panel(cat, mask, colour, caption="vit_b: IoU 12.5")
    path = tmp_path / "panel.png"
    path.write_bytes(unsegment.report.png_bytes(picture))
    with Image.open(path) as im:
        drawn = np.asarray(im.convert("RGB"))[:64, :96]  # the image; the caption is below it
    changed = (drawn != cat).any(axis=2)
    np.testing.assert_array_equal(changed, mask)
    outline = unsegment.report.boundary(mask)
    assert (drawn[outline] == colour).all()
    # a mask with an inside (random weights predict speckles): half colour inside the outline
    rect, _ = two_objects()
    drawn = unsegment.report.overlay(cat, rect, colour)
    inside = rect & ~unsegment.report.boundary(rect)
    assert inside.sum() == 28 * 38  # the 30 x 40 rectangle less its one-pixel outline
    np.testing.assert_array_equal(drawn[inside], (cat[inside].astype(int) + colour + 1) // 2)
    np.testing.assert_array_equal(drawn[~rect], cat[~rect])
    # the perturbation panel's scale: eps (or the pair's L-inf) is white
    caption = unsegment.report.perturbation_caption(8 / 255, "eps")
    assert caption == "|protected - clean| x 31.9: white = 8/255 (eps)"
    diff = unsegment.report.perturbation(np.zeros((1, 3, 3)), np.full((1, 3, 3), 4 / 255), 8 / 255)
    assert (diff == 128).all()  # half of eps: half of white


class Links(__import__("html.parser").parser.HTMLParser):
    """The href and src attributes of a page, and the cells of each table by its id."""

    def __init__(self):
        super().__init__()
        self.links, self.tables, self.table, self.cell = [], {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("href", "src") if k in attrs]
        if tag == "table":
            self.table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr":
            self.table.append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.table[-1].append(self.cell)
            self.cell = None


def test_report_has_a_picture_per_image_and_the_jsons_numbers(cli, tiny_checkpoints, tmp_path):
    rect, ell = two_objects()
    for name, pixels in (("cat", small_photo((96, 64))), ("coffee #2", photo("coffee.png"))):
        save(tmp_path / "clean" / f"{name}.png", pixels)
        save(tmp_path / "adv" / f"{name}.png", noisy(pixels, 4))
        write_annotations(tmp_path / "ann" / f"{name}.json", [rect, ell])
    pair = ["--clean", tmp_path / "clean", "--adv", tmp_path / "adv"]
    run = [*pair, "--annotations", tmp_path / "ann", "--probes", "none,noise:4"]
    run += ["--models", models(tiny_checkpoints, "vit_b"), *FAST]
    code, _, stderr = cli(*run, "--out", tmp_path / "a.json", "--report", tmp_path / "report")
    assert code == 0, stderr
    page = (tmp_path / "report" / "index.html").read_text()
    links = Links()
    links.feed(page)
    # links are URL-encoded: a # in a file name is not a fragment
    assert sorted(links.links) == ["images/cat.png.png", "images/coffee%20%232.png.png"]
    for link in links.links:
        with Image.open(tmp_path / "report" / urllib.parse.unquote(link)) as im:
            assert im.format == "PNG" and im.width > 4 * 96
    # the summary table is the JSON's figures, to two decimals
    result = json.loads((tmp_path / "a.json").read_text())
    head, *rows = links.tables["summary"]
    assert len(rows) == 2 * 3  # probes x prompt types
    for cells in rows:
        row = dict(zip(head, cells))
        scores = result["probes"][row["probe"]]
        adv, clean = (scores[s][row["model"]][row["prompts"]] for s in ("adv", "clean"))
        assert int(row["count"]) == adv["count"]
        for column, value in [
            ("mIoU", adv["miou"]),
            ("ASR@50", adv["asr50"]),
            ("ASR@10", adv["asr10"]),
            ("clean mIoU", result["summary"][row["model"]][row["prompts"]]["clean_miou"]),
            ("probed clean mIoU", clean["miou"]),
            ("probed clean ASR@50", clean["asr50"]),
            ("PSNR mean", scores["quality"]["psnr_mean"]),
        ]:
            assert row[column] == f"{value:.2f}", (row, column)
        assert int(row["L-inf max"]) == scores["quality"]["linf_max"]
    head, *rows = links.tables["images"]
    assert [dict(zip(head, r))["vit_b mIoU"] for r in rows] == [
        f"{r['metrics']['vit_b']['all']['miou']:.2f}" for r in result["images"]
    ]

    # the same run again: the same bytes; without --report: the same JSON
    code, _, stderr = cli(*run, "--out", tmp_path / "b.json", "--report", tmp_path / "again")
    assert code == 0, stderr
    for path in ("index.html", "images/cat.png.png", "images/coffee #2.png.png"):
        assert (tmp_path / "report" / path).read_bytes() == (tmp_path / "again" / path).read_bytes()
    code, _, stderr = cli(*run, "--out", tmp_path / "c.json")
    assert code == 0, stderr
    for other in ("b.json", "c.json"):
        again = json.loads((tmp_path / other).read_text().replace(other, "a.json"))
        assert untimed(again) == untimed(result)


def untimed(result: dict) -> dict:
    """A results JSON without its seconds, which vary from run to run."""
    images = [{k: v for k, v in r.items() if k != "seconds"} for r in result["images"]]
    return {**{k: v for k, v in result.items() if k != "seconds_per_image"}, "images": images}


def test_report_in_clean_reference_mode_says_what_the_reference_is(cli, tiny_checkpoints, tmp_path):
    cat = small_photo((96, 64))
    clean, adv = save(tmp_path / "cat.png", cat), save(tmp_path / "adv.png", noisy(cat, 4))
    code, _, stderr = cli(
        "--clean", clean, "--adv", adv, "--models", models(tiny_checkpoints, "vit_b"), *FAST,
        *OPEN_GENERATOR, "--report", tmp_path / "report", "--report-objects", "1",
    )  # fmt: skip
    assert code == 0, stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "clean-reference mode: each model&#x27;s reference is its own mask" in page
    with Image.open(tmp_path / "report" / "images" / "cat.png.png") as im:
        # one object: the header row, then one row of four panels
        assert im.height < 2 * (64 + 2 * unsegment.report.LINE + 2 * unsegment.report.GAP) + 20


def test_report_folder_problems_come_before_any_model_loads(cli, tmp_path, no_model):
    cat = save(tmp_path / "cat.png", small_photo())
    pair = ["--clean", cat, "--adv", cat, "--models", "vit_b"]
    (tmp_path / "file").write_text("")
    for report, message in [
        (tmp_path / "file", "--report names a folder, and this is a file"),
        (tmp_path / "no" / "such", "its parent folder"),
        (tmp_path, "is one of the inputs"),
    ]:
        code, stdout, stderr = cli(*pair, "--report", report)
        assert code == 1 and stdout == "" and message in stderr, stderr
        assert len(stderr.splitlines()) == 1


# -----------------------------------------------------------------------------------------------
# Model packages (each family against its real package: test_variants.py)


@pytest.mark.parametrize(
    "model, package, install",
    [
        ("hq_vit_l", "segment_anything_hq", "pip install segment-anything-hq timm"),
        ("mobile_sam", "mobile_sam", "pip install mobilesam-mirror timm"),
        ("sam2_l", "sam2", "SAM2_BUILD_CUDA=0 pip install sam2"),
    ],
)
def test_missing_package_is_one_line_naming_what_to_install(
    cli, tmp_path, monkeypatch, model, package, install
):
    monkeypatch.setitem(sys.modules, package, None)  # makes the import fail, installed or not
    cat = save(tmp_path / "cat.png", small_photo((96, 64)))
    code, _, stderr = cli("--clean", cat, "--adv", cat, "--models", f"{model}=x.pt", *FAST)
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith(
        f"error: model {model} needs the {package}"
    )
    assert install in stderr


# -----------------------------------------------------------------------------------------------
# Bad input


def test_folder_mode_reports_bad_pairs_and_scores_the_rest(cli, tiny_checkpoints, tmp_path):
    cat = small_photo((96, 64))
    rect, _ = two_objects()
    clean, adv, ann = tmp_path / "clean", tmp_path / "adv", tmp_path / "ann"
    for name in ("good", "twinless", "resized", "corrupt", "nojson", "badsize", "twins"):
        save(clean / f"{name}.bmp", cat)
        if name != "nojson":
            write_annotations(ann / f"{name}.json", [rect])
    save(adv / "good.png", cat)  # a .bmp pairs with the .png of the same stem
    save(adv / "resized.png", small_photo((80, 60)))
    save(adv / "corrupt.png", cat)
    save(adv / "nojson.png", cat)
    save(adv / "badsize.png", cat)
    save(adv / "twins.png", cat)
    save(adv / "twins.jpg", cat)
    (ann / "corrupt.json").write_text('{"annotations": [')
    write_annotations(ann / "badsize.json", [np.ones((10, 10), bool)])
    out, table_csv = tmp_path / "r.json", tmp_path / "r.csv"
    pair = ["--clean", clean, "--adv", adv, "--annotations", ann]
    outputs = ["--out", out, "--csv", table_csv]
    code, stdout, stderr = cli(
        *pair, *outputs, "--models", models(tiny_checkpoints, "vit_b"), *FAST
    )
    assert code == 1
    errors = stderr.strip().splitlines()
    assert all(e.startswith("error: ") for e in errors) and "Traceback" not in stderr
    expected = [
        f"{clean / 'twinless.bmp'}: no adversarial twin twinless.* in {adv}",
        f"{clean / 'twins.bmp'}: several adversarial twins",
        f"{adv / 'resized.png'}: adversarial image is 80x60, its clean twin "
        f"{clean / 'resized.bmp'} is 96x64",
        f"{ann / 'nojson.json'}: no such annotation file",
        f"{ann / 'corrupt.json'}: not valid JSON",
        f"{ann / 'badsize.json'}: annotation 0 is 10x10, the clean image 96x64",
        "6 image(s) not scored",
    ]
    for message in expected:
        assert sum(message in e for e in errors) == 1, (message, errors)
    assert len(errors) == len(expected)
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["images"]] == ["good.bmp"] and len(result["failures"]) == 6
    assert result["images"][0]["adv"] == str(adv / "good.png")
    assert "good.bmp" in table_csv.read_text() and "vit_b" in stdout


def test_size_mismatch_fails_before_loading_any_model(tmp_path):
    clean = save(tmp_path / "clean.png", small_photo((96, 64)))
    adv = save(tmp_path / "adv.png", small_photo((64, 96)))
    run = run_script("--clean", clean, "--adv", adv, "--models", "vit_b=/no/such/checkpoint.pth")
    assert run.returncode == 1
    assert run.stderr == (
        f"error: {adv}: adversarial image is 64x96, its clean twin {clean} is 96x64\n"
    )


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "unknown model",
            "error: unknown model 'vit_x'; choose from vit_b, vit_l, vit_h, sam_vit, hq_vit_b",
        ),
        ("missing clean", "error: {tmp}/missing.png: no such file or folder"),
        ("corrupt adversarial", "error: {tmp}/adv.png: not an image file that PIL can read"),
        ("file and folder", "must be two files or two folders"),
        ("no annotations", "error: {tmp}/ann: no such annotation folder or file"),
    ],
)
def test_bad_input_is_one_line(cli, tmp_path, case, message):
    clean = save(tmp_path / "clean.png", small_photo((96, 64)))
    adv = tmp_path / "adv.png"
    adv.write_bytes(b"not a png at all")
    args = {
        "unknown model": ["--clean", clean, "--adv", clean, "--models", "vit_b,vit_x"],
        "missing clean": ["--clean", tmp_path / "missing.png", "--adv", clean],
        "corrupt adversarial": ["--clean", clean, "--adv", adv],
        "file and folder": ["--clean", clean, "--adv", tmp_path],
        "no annotations": ["--clean", clean, "--adv", clean, "--annotations", tmp_path / "ann"],
    }[case]
    if case != "unknown model":
        args += ["--models", "vit_b"]
    code, _, stderr = cli(*args)  # any exception other than the reported error fails the test
    assert code == 1 and stderr.count("\n") == 1
    assert message.format(tmp=tmp_path) in stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--jpeg", "0"], "argument --jpeg: 0: must be at least 1"),
        (["--jpeg", "101"], "argument --jpeg: 101: must be at most 100"),
        (["--jpeg", "high"], "argument --jpeg: 'high': not a whole number"),
        (["--resize", "2"], "argument --resize: 2: must be at most 1.0"),
        (["--resize", "0"], "argument --resize: 0: must be above 0.0"),
        (["--resize", "nan"], "argument --resize: nan: must be above 0.0"),
        (["--points", "0", "--boxes", "0"], "--points and --boxes are both 0"),
        (["--points", "-1"], "argument --points: -1: must be at least 0"),
        (["--seed", "-1"], "argument --seed: -1: must be at least 0"),
        (["--max-masks", "0"], "argument --max-masks: 0: must be at least 1"),
        (["--points-per-side", "0"], "argument --points-per-side: 0: must be at least 1"),
        (["--pred-iou-thresh", "1.5"], "argument --pred-iou-thresh: 1.5: must be at most 1.0"),
        (["--max-pixels", "0"], "argument --max-pixels: 0: must be at least 1"),
        (["--bench", "64"], "argument --bench: '64': expected WxH, both at least 16"),
        (["--bench", "8x8"], "argument --bench: '8x8': expected WxH, both at least 16"),
        (["--models", None], "the following arguments are required: --models"),
        (["--clean", None], "--clean and --adv are required (unless --bench)"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(cli, flags, message):
    args = {"--clean": "a.png", "--adv": "b.png", "--models": "vit_b"}
    args.update(zip(flags[::2], flags[1::2]))
    argv = [a for flag, value in args.items() if value is not None for a in (flag, value)]
    code, _, stderr = cli(*argv)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: ") and message in stderr and "Traceback" not in stderr


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load or build a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module, name in [(ev, "load_segmenter"), (uad, "load_sam"), (uad, "build_sam")]:
        monkeypatch.setattr(module, name, refuse)


# case -> (the adversarial image and more flags, the message); {tmp} stands for tmp_path, where
# clean.png (96 x 64), tiny.png (12 x 12), truncated.png, notes.txt, sub/ and ann/clean.json lie,
# and the annotation files small/clean.json (a 10 x 10 mask), bad/ (truncated JSON) and empty/
EARLY_BAD_INPUTS = {
    "device gpu": (["clean.png", "--device", "gpu"], "device 'gpu': not a device"),
    "device cuda:7": (["clean.png", "--device", "cuda:7"], "device 'cuda:7'"),
    "checkpoint is a folder": (["clean.png", "--models", "vit_b={tmp}"], "{tmp}: is a folder"),
    "missing checkpoint": (
        ["clean.png", "--models", "vit_b={tmp}/no.pth"],
        "{tmp}/no.pth: no such checkpoint file",
    ),
    "empty checkpoint path": (["clean.png", "--models", "vit_b="], "vit_b=: no checkpoint after"),
    "out into a missing folder": (
        ["clean.png", "--out", "{tmp}/no/r.json"],
        "{tmp}/no/r.json: folder {tmp}/no does not exist",
    ),
    "out under a file": (
        ["clean.png", "--out", "{tmp}/clean.png/r.json"],
        "folder {tmp}/clean.png is not a folder",
    ),
    "out is a folder": (["clean.png", "--out", "{tmp}/sub"], "{tmp}/sub: is a folder"),
    "out unwritable": (["clean.png", "--out", "/proc/r.json"], "cannot write to folder /proc"),
    "csv unwritable": (["clean.png", "--csv", "/proc/r.csv"], "cannot write to folder /proc"),
    "out and csv the same": (
        ["clean.png", "--out", "{tmp}/r.txt", "--csv", "{tmp}/r.txt"],
        "--out and --csv name the same file",
    ),
    "out would replace an input": (
        ["clean.png", "--csv", "{tmp}/clean.png"],
        "{tmp}/clean.png: is one of the inputs",
    ),
    "out would replace an annotation": (
        ["clean.png", "--annotations", "{tmp}/ann", "--out", "{tmp}/ann/clean.json"],
        "{tmp}/ann/clean.json: is one of the inputs",
    ),
    "over the pixel limit": (
        ["clean.png", "--max-pixels", "1000"],
        "clean.png: image is 96x64 (0 Mpx), over the limit of 1000 pixels",
    ),
    "image too small": (["tiny.png"], "tiny.png: image is 12x12, at least 16x16 needed"),
    "truncated adversarial image": (
        ["truncated.png"],
        "{tmp}/truncated.png: truncated or corrupt image",
    ),
    "adversarial is a folder": (["sub"], "must be two files or two folders"),
    "text file as image": (["notes.txt"], "notes.txt: not an image file that PIL"),
    "annotation file not JSON": (
        ["clean.png", "--annotations", "{tmp}/bad"],
        "{tmp}/bad/clean.json: not valid JSON",
    ),
    "annotation file of another size": (
        ["clean.png", "--annotations", "{tmp}/small/clean.json"],
        "{tmp}/small/clean.json: annotation 0 is 10x10, the clean image 96x64",
    ),
    "annotation file with no annotations": (
        ["clean.png", "--annotations", "{tmp}/empty"],
        "{tmp}/empty/clean.json: no 'annotations' list",
    ),
    "bench over the pixel limit": (
        ["clean.png", "--bench", "4000x3000", "--max-pixels", "1000000"],
        "--bench 4000x3000: over --max-pixels 1000000",
    ),
}


@pytest.mark.parametrize("case", EARLY_BAD_INPUTS)
def test_bad_input_is_found_before_any_model_loads(cli, tmp_path, no_model, case):
    clean = save(tmp_path / "clean.png", small_photo((96, 64)))
    save(tmp_path / "tiny.png", small_photo((12, 12)))
    (tmp_path / "truncated.png").write_bytes(clean.read_bytes()[:200])  # header, a little data
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    (tmp_path / "sub").mkdir()
    write_annotations(tmp_path / "ann" / "clean.json", [two_objects()[0]])
    write_annotations(tmp_path / "small" / "clean.json", [np.ones((10, 10), bool)])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "clean.json").write_text('{"annotations": [')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "clean.json").write_text('{"images": []}')
    (adv, *flags), message = EARLY_BAD_INPUTS[case]
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--models" not in flags:
        flags += ["--models", "vit_b"]
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    code, out, err = cli("--clean", clean, "--adv", tmp_path / adv, *flags)
    assert code == 1 and out == "", (out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(tmp=tmp_path) in err, err
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_unreadable_checkpoints_are_one_line_and_nothing_is_written(
    cli, tiny_checkpoints, tmp_path
):
    cat = save(tmp_path / "cat.png", small_photo((96, 64)))
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoints["vit_b"].read_bytes()[:5000])
    out = tmp_path / "r.json"
    for path, reason in [(text, "not a PyTorch file"), (truncated, "truncated or corrupt")]:
        code, stdout, stderr = cli(
            "--clean", cat, "--adv", cat, "--out", out, "--models", f"vit_b={path}", *FAST
        )
        assert code == 1 and stdout == ""
        assert stderr == f"error: {path}: not a readable PyTorch checkpoint ({reason})\n"
        assert not out.exists()


def test_folder_of_unreadable_adversarial_images_stops_before_any_model_loads(
    cli, tmp_path, monkeypatch, no_model
):
    cat = small_photo((96, 64))
    clean, adv = tmp_path / "clean", tmp_path / "adv"
    for name in ("locked", "truncated", "big"):
        save(clean / f"{name}.png", cat)
    locked = save(adv / "locked.png", cat)
    save(adv / "truncated.png", cat)
    (adv / "truncated.png").write_bytes((adv / "truncated.png").read_bytes()[:300])
    save(adv / "big.png", small_photo((192, 128)))  # over --max-pixels, and another size
    real_open = Image.open

    def open_image(fp, *args, **kwargs):  # as root, chmod 000 would not stop the read
        if Path(fp) == locked:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_image)
    out = tmp_path / "r.json"
    pair = ["--clean", clean, "--adv", adv, "--max-pixels", 10000, "--out", out]
    code, stdout, stderr = cli(*pair, "--models", "vit_b", *FAST)
    assert code == 1 and stdout == "" and "Traceback" not in stderr
    errors = stderr.splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors), errors
    assert f"{adv / 'big.png'}: image is 192x128" in errors[0] and "10000 pixels" in errors[0]
    assert f"{locked}: " in errors[1] and "Permission denied" in errors[1]
    assert f"{adv / 'truncated.png'}: truncated or corrupt image" in errors[2]
    assert errors[3] == f"error: no image pair left to score in {clean}"
    assert not out.exists()


def help_entries(text: str) -> dict:
    """{first option string: its whole entry} of the "options:" block of argparse's --help."""
    block = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries, flag = {}, None
    for line in block.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        else:  # a continuation of the entry above
            entries[flag] += " " + line.strip()
    return entries


def test_help_lists_every_flag_with_its_default_and_every_model(cli):
    code, stdout, _ = cli("--help")
    assert code == 0
    entries = help_entries(stdout)
    for action in ev.build_parser()._actions:
        flag = action.option_strings[0]
        assert flag in entries, flag
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"({action.default})" in entries[flag], (flag, entries[flag])
    assert "(2250x1500)" in entries["--bench"]  # --bench's value when given alone
    usage = stdout.split("\n\n", 1)[0]
    assert " --models LIST" in usage and "[--models" not in usage  # required, so not bracketed
    epilog = stdout.split("\noptions:\n", 1)[1].split("\n\n", 1)[1]
    for name in unsegment.models.MODELS:  # each model name on its own, not inside a longer one
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.+])", epilog), name


# -----------------------------------------------------------------------------------------------
# Cost


GENERATOR_LINE = (
    r"vit_b automatic mask generator: (\d+\.\d\d) s per run "
    r"\(2x2 points, thresholds 0, (\d+) masks\)"
)
BENCH_LINE = (
    r"vit_b: (\d+\.\d\d) s per image "
    r"\(encoder (\d+\.\d\d) s for 2 passes, mask decoding and IoU (\d+\.\d\d) s\)"
)


def test_bench_prints_seconds_per_image_per_model(cli):
    few = ["--max-masks", "1", "--points", "1", "--boxes", "1", "--points-per-side", "2"]
    code, stdout, stderr = cli("--bench", "64x48", "--models", "vit_b", *few)
    assert code == 0, stderr
    assert "random-init weights, 64x48 image, 2 prompts" in stdout
    (line,) = [line for line in stdout.splitlines() if line.startswith("vit_b:")]
    total, encode, decode = map(float, re.fullmatch(BENCH_LINE, line).groups())
    assert total > 0 and encode > 0 and decode > 0
    assert total == pytest.approx(encode + decode, abs=0.015)  # the parts add up, to rounding
    (line,) = [line for line in stdout.splitlines() if line.startswith("vit_b automatic")]
    seconds, masks = re.fullmatch(GENERATOR_LINE, line).groups()
    assert float(seconds) > 0 and 0 <= int(masks) <= 2 * 2 * 3  # 4 points, 3 masks each


# -----------------------------------------------------------------------------------------------
# For reproduction: the authors' logs' prompts, FastSAM's colour order as the paper's code had it


def test_log_prompts_scores_exactly_the_prompts_of_the_authors_log(cli, tiny_checkpoints, tmp_path):
    cat = small_photo((96, 64))
    clean, adv = save(tmp_path / "sa_7.png", cat), save(tmp_path / "adv.png", noisy(cat, 6))
    masks = two_objects()
    write_annotations(tmp_path / "ann" / "sa_7.json", masks)
    logged = write_authors_log(tmp_path / "logs" / "UAD", 7, "UAD", masks)
    write_authors_log(tmp_path / "logs" / "UAD", 8, "UAD", masks, seed=1)  # another image's
    out = tmp_path / "r.json"
    code, stdout, stderr = cli(
        *("--clean", clean, "--adv", adv, "--annotations", tmp_path / "ann", "--out", out),
        *("--models", models(tiny_checkpoints, "vit_b"), "--log-prompts", tmp_path / "logs/UAD"),
        "--quiet",
    )
    assert code == 0, stderr
    (row,) = json.loads(out.read_text())["images"]
    assert [(p["object"], p["coords"]) for p in row["prompts"]] == logged  # 16, in their order
    assert [p["kind"] for p in row["prompts"]] == (["point"] * 5 + ["box"] * 3) * 2
    # the same prompts drawn by eval.py itself would be others
    drawn = ev.sample_prompts([ev.RefObject(m, ev.mask_bbox(m)) for m in masks], "sa_7", 0, 5, 3)
    assert [list(p.coords) for p in drawn] != [c for _, c in logged]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no log", "{tmp}/logs: no log 9_ATTACK.json of sa_9"),
        ("not sa_N", "photo: not an SA-1B name sa_N"),
        ("outside", "m0_p0 [500, 3]: annotation 0 is not among the 2 scored (--max-masks) or not"),
        ("beyond the masks", "m2_p0 [5, 5]: annotation 2 is not among the 2 scored"),
        ("not a log", "{tmp}/logs/9_UAD.json: not the authors' log of sa_9"),
    ],
)
def test_a_bad_log_is_one_line_before_any_model_loads(cli, tmp_path, no_model, case, message):
    name = "photo" if case == "not sa_N" else "sa_9"
    clean = save(tmp_path / f"{name}.png", small_photo((96, 64)))
    write_annotations(tmp_path / "ann" / f"{name}.json", two_objects())
    logs = tmp_path / "logs"
    logs.mkdir()
    evaluations = {"outside": {"m0_p0": {"prompt": [500, 3]}}, "beyond the masks": {}}
    evaluations["beyond the masks"] = {"m2_p0": {"prompt": [5, 5]}}
    if case in evaluations:
        log = {"imgid": 9, "adv_method": "UAD", "evaluations": evaluations[case]}
        (logs / "9_UAD.json").write_text(json.dumps(log))
    if case == "not a log":
        (logs / "9_UAD.json").write_text(json.dumps({"imgid": 10, "evaluations": {}}))
    code, out, err = cli(
        *("--clean", clean, "--adv", clean, "--annotations", tmp_path / "ann"),
        *("--models", "vit_b", "--log-prompts", logs),
    )
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err, err


def test_log_prompts_need_annotations(cli, tmp_path):
    code, _, stderr = cli(
        "--clean", "a.png", "--adv", "b.png", "--models", "vit_b", "--log-prompts", tmp_path
    )
    assert code == 2 and "--log-prompts needs --annotations" in stderr


@pytest.mark.parametrize("rgb", [False, True])
def test_fastsam_gets_bgr_or_with_fastsam_rgb_the_rgb_array(monkeypatch, rgb):
    fastsam = pytest.importorskip("ultralytics.models.fastsam")

    given = []

    class Recorder:  # FastSAMPredictor's interface, recording what it is handed
        def __init__(self, overrides):
            pass

        def setup_model(self, model, verbose):
            pass

        def __call__(self, source):
            given.append(source)
            return [types.SimpleNamespace(masks=None)]

    monkeypatch.setattr(fastsam, "FastSAMPredictor", Recorder)
    image = small_photo((96, 64))
    prompter = ev.segmenter_of("fastsam", None, "cpu", fastsam_rgb=rgb).new_predictor()
    prompter.set_image(image)
    assert np.array_equal(given[0], image if rgb else image[..., ::-1])
    assert prompter.masks.shape == (0, 64, 96)
