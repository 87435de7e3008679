"""benchmarks/reproduce.py end to end on a tiny SA-1B-like folder and tiny random-init models.

The folder: sa_1, sa_2, sa_10 and sa_11 (96 x 64 JPEGs, two annotated objects each, their masks
as COCO RLE strings in SA-1B's JSON layout). --images 3 takes sa_1, sa_2 and sa_10 (by number,
not by name). sa_2.jpg is truncated: it is left out before anything runs. sa_10.json is
truncated: sa_10 is protected (it is sa_1's aa target) but cannot be scored, so sa_1 alone
reaches the table, which keeps the scoring (a mask decode per prompt, 0.2 s each here) cheap. One
full run (every attack, two models, a step or two each) is shared by the tests; the others copy
it or start their own.
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unsegment.images
import unsegment.models
from helpers import (
    EXAMPLES,
    ROOT,
    TINY_ARCHS,
    annotation,
    build_tiny_sam,
    load_script,
    two_objects,
    write_authors_log,
)

SCRIPT = "benchmarks/reproduce.py"
reproduce = load_script(SCRIPT)

# vit_l takes vit_b's tiny shape (with other weights), so that scoring it costs as little
ARCHS = {**TINY_ARCHS, "vit_l": TINY_ARCHS["vit_b"]}
ATTACKS = ["paper", "reference", "authors", "aa", "noise"]
VARIANTS = ["clean", *ATTACKS]
# a step or two, one prompt of each kind, and features from the first block only (the encoder's
# later blocks would cost seconds here and test nothing more)
FAST = "--steps 1 --deform-steps 2 --proxy-steps 1 --points 1 --boxes 1 --max-masks 1".split()
FAST += ["--layers", "0", "--images", "3", "--device", "cpu"]
# reproduce.py in a process of its own, loaded as load_script loads it, with the same tiny shapes;
# it waits after the first image it protects, to be killed there
SUBPROCESS = f"""
import importlib.util, sys, torch
torch.set_num_threads(1)
import unsegment.models
unsegment.models.SAM_ARCHS = {ARCHS!r}
spec = importlib.util.spec_from_file_location("reproduce", {str(ROOT / SCRIPT)!r})
reproduce = importlib.util.module_from_spec(spec)
sys.modules["reproduce"] = reproduce
spec.loader.exec_module(reproduce)
protect_one = reproduce.protect_one


def first_then_wait(*args):  # so that the test kills the process between two images
    line = protect_one(*args)
    print("recorded", line, flush=True)
    import time
    time.sleep(300)


reproduce.protect_one = first_then_wait
sys.exit(reproduce.main(sys.argv[1:]))
"""


def make_sa1b(folder: Path) -> Path:
    folder.mkdir(parents=True)
    photos = {1: "chelsea.png", 2: "coffee.png", 10: "astronaut.png", 11: "rocket.jpg"}
    for n, name in photos.items():
        with Image.open(EXAMPLES / name) as im:
            im.convert("RGB").resize((96, 64), Image.BILINEAR).save(folder / f"sa_{n}.jpg")
        anns = [annotation(mask) for mask in two_objects()]
        assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)
        (folder / f"sa_{n}.json").write_text(json.dumps({"image": {}, "annotations": anns}))
    for name in ("sa_2.jpg", "sa_10.json"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """{"sa1b": folder, "vit_b": checkpoint, "vit_l": checkpoint}."""
    root = tmp_path_factory.mktemp("reproduce")
    paths = {"sa1b": make_sa1b(root / "sa1b")}
    for seed, name in enumerate(("vit_b", "vit_l")):
        paths[name] = root / f"{name}.pth"
        torch.save(build_tiny_sam("vit_b", seed=seed).state_dict(), paths[name])
    return paths


def command(inputs, out: Path, attacks=ATTACKS, models=("vit_b", "vit_l"), extra=()) -> list:
    models = ",".join(f"{m}={inputs[m]}" for m in models)
    return [
        *("--sa1b", inputs["sa1b"], "--out", out, "--attacks", ",".join(attacks)),
        *("--models", models, "--surrogate-checkpoint", inputs["vit_b"], *FAST, *extra),
    ]


def run(args):
    """reproduce.main(args) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unsegment.models, "SAM_ARCHS", ARCHS)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = reproduce.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    """The full run: (run folder, exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("first") / "run"
    return (out, *run(command(inputs, out)))


def cells(out: Path) -> dict:
    """(attack, model, prompt type) -> the table's numbers (its timings are elsewhere)."""
    data = json.loads((out / "table.json").read_text())
    return {(c["attack"], c["model"], c["prompts"]): c for c in data["table"]}


def stamps(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_the_table_has_every_attack_and_model_beside_the_papers_numbers(first_run):
    out, code, stdout, stderr = first_run
    assert code == 1, stderr  # 1: an image was left out
    table = cells(out)
    assert {(a, m) for a, m, _ in table} == {(a, m) for a in VARIANTS for m in ("vit_b", "vit_l")}
    for (attack, model, kind), c in table.items():
        assert c["count"] == {"point": 1, "box": 1, "all": 2}[kind]  # 1 image, 1 object
        assert 0 <= c["miou"] <= 100 and 0 <= c["asr50"] <= 100
        assert c["clean_miou"] == table[("clean", model, kind)]["miou"]
    assert table[("paper", "vit_b", "all")]["paper_miou"] == 51.53
    assert table[("paper", "vit_b", "point")]["paper_miou"] == 37.64
    assert table[("authors", "vit_l", "all")]["paper_asr50"] == 26.43
    assert table[("aa", "vit_l", "all")]["paper_miou"] == 70.70
    assert table[("noise", "vit_b", "all")]["paper_miou"] is None
    assert table[("clean", "vit_b", "all")]["paper_miou"] is None
    data = json.loads((out / "table.json").read_text())
    assert data["images"] == ["sa_1"]  # sa_2 and sa_10 are corrupt; sa_11 is the 4th by number
    assert len(data["failures"]) == 2
    assert data["settings"]["seed"] == 0 and data["settings"]["prompts"]["points"] == 1
    assert data["settings"]["attacks"]["authors"]["padding"] == "reflection"
    assert data["settings"]["attacks"]["paper"]["steps"] == 1
    assert "torch" in data["versions"] and data["device"]["device"] == "cpu"
    seconds = data["seconds_per_image"]
    assert set(seconds["protect"]) == set(ATTACKS) and set(seconds["score"]) == {"vit_b", "vit_l"}
    assert all(s > 0 for s in seconds["protect"].values())
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6 * 2 * 3 and csv_lines[0].startswith("attack,model,prompts")
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert (
        len(rows) == 2 + 6 * 2
    )  # the header and its rule, then a row per attack (and clean) x model
    assert any(r.startswith("| paper | vit_b | ") and "(51.53)" in r for r in rows)
    assert "clean mIoU: vit_b" in stdout and "whole pipeline" in stdout


def test_progress_covers_each_stage(first_run):
    _, _, stdout, stderr = first_run
    assert "protect: 5 attack(s) x 2 image(s), 0 done earlier, 10 to do" in stderr
    assert "[10/10] protect noise sa_10.jpg" in stderr and "ETA" in stderr
    assert "score: 2 model(s) x 2 image(s) x 6 (clean + 5 attack(s))" in stderr
    assert "[3/4] score vit_l sa_1.jpg" in stderr and "score vit_l sa_10" not in stderr
    assert stdout.count("protected ") == 10 and stdout.count("scored ") == 2


@pytest.mark.parametrize(
    "name, problem", [("sa_2.jpg", "truncated"), ("sa_10.json", "not valid JSON")]
)
def test_a_corrupt_file_is_one_line_and_its_image_left_out(first_run, name, problem):
    out, _, _, stderr = first_run
    lines = [line for line in stderr.splitlines() if name in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in (out / "paper").iterdir()) == ["sa_1.png", "sa_10.png"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_saved_file_is_within_eps_of_the_clean_image(first_run, inputs, attack):
    out = first_run[0]
    for name in ("sa_1", "sa_10"):
        clean = unsegment.images.read_image(inputs["sa1b"] / f"{name}.jpg").pixels.astype(int)
        saved = unsegment.images.read_image(out / attack / f"{name}.png").pixels.astype(int)
        assert saved.shape == clean.shape and 0 < np.abs(saved - clean).max() <= 8


def test_deleting_one_protected_image_redoes_only_that_image(first_run, inputs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)  # copy2 keeps the files' times
    deleted = out / "paper" / "sa_1.png"
    before, old_bytes = stamps(out), deleted.read_bytes()
    deleted.unlink()
    code, stdout, stderr = run(command(inputs, out))
    assert code == 1  # sa_2 still cannot be read
    assert "protect: 5 attack(s) x 2 image(s), 9 done earlier, 1 to do" in stderr
    assert stdout.count("protected ") == 1 and "protected paper/sa_1.png" in stdout
    # the same seed made the same file, so its recorded scores still hold
    assert deleted.read_bytes() == old_bytes
    assert "2 image(s) x model(s) done earlier, 2 to do" in stderr  # sa_10's JSON, again
    assert "scored" not in stdout
    changed = {p for p, t in stamps(out).items() if before.get(p) != t}
    records = out / "records" / "protect" / "paper" / "sa_1.json"
    assert changed == {deleted, records, out / "table.json", out / "table.csv"}
    assert cells(out) == cells(first_run[0])


def test_a_killed_run_resumes_without_redoing_work_and_gives_the_same_table(
    first_run, inputs, tmp_path, monkeypatch
):
    """Killed between two images, then interrupted while scoring, then run to the end: nothing
    finished is redone, and the table is the first run's (same seed), cell for cell."""
    out = tmp_path / "run"
    args = [str(a) for a in command(inputs, out, attacks=("aa", "noise"), models=("vit_b",))]
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,  # the repository's uad and unsegment first on sys.path, as in this process
    )
    try:
        first = proc.stdout.readline()  # once the image and its record are on disk
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert first.startswith("recorded protected aa/sa_1.png"), first
    records = sorted((out / "records" / "protect").rglob("*.json"))
    assert [p.name for p in records] == ["sa_1.json"]
    kept = {p: p.stat().st_mtime_ns for p in [*records, out / "aa" / "sa_1.png"]}

    calls = []

    def interrupted_on_the_third(*a):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return score_image(*a)

    score_image = reproduce.score_image
    monkeypatch.setattr(reproduce, "score_image", interrupted_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(args)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # not protected again
    scored = sorted((out / "records" / "score").rglob("*.json"))
    assert len(scored) == 2  # the two scores made before the interruption

    calls.clear()
    monkeypatch.setattr(reproduce, "score_image", lambda *a: calls.append(a) or score_image(*a))
    code, _, stderr = run(args)
    assert code == 1  # sa_2
    assert "protect: 2 attack(s) x 2 image(s), 4 done earlier, 0 to do" in stderr
    assert len(calls) == 3 - 2  # sa_1's clean, aa and noise, less the 2 scored before
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    ours, theirs = cells(out), cells(first_run[0])
    assert set(ours) == {(v, "vit_b", k) for v in ("clean", "aa", "noise") for k in reproduce.KINDS}
    assert all(ours[c] == theirs[c] for c in ours)  # the same seed, the same numbers


def test_aa_targets_are_other_images_drawn_from_the_seed():
    items = [reproduce.Item(Path(f"sa_{n}.jpg"), Path(f"sa_{n}.json")) for n in range(1, 9)]
    by_seed = [reproduce.choose_targets(items, seed) for seed in (0, 0, 1)]
    assert by_seed[0] == by_seed[1] and by_seed[0] != by_seed[2]
    for targets in by_seed:
        assert all(targets[i.name].name != i.name for i in items)
    assert len({t.name for t in by_seed[0].values()}) > 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attacks", "paper,bogus"], "--attacks: unknown attack 'bogus'"),
        (["--attacks", "reference,no-fidelity"], "reference and no-fidelity are the same attack"),
        (["--steps", "0"], "--steps 0: stage 2's PGD steps are what change the image"),
        (["--models", "vit_b=missing.pth"], "missing.pth: no such checkpoint file"),
        (["--eps", "0.03"], "--eps 0.03: below one grey level"),
        (["--layers", "3,12"], "--layers: vit_b has blocks 0..7"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(inputs, tmp_path, flags, message):
    code, stdout, stderr = run(command(inputs, tmp_path / "run", extra=flags))
    assert code != 0 and stdout == ""
    assert stderr.strip().splitlines() == [stderr.strip()] and message in stderr, stderr
    assert not (tmp_path / "run").exists()


def test_fewer_images_than_asked_are_taken_and_noise_loads_no_surrogate(
    inputs, tmp_path, monkeypatch
):
    """--images 1000 on a folder of 4 takes the 4, saying so in one line; the noise baseline
    draws its noise without the surrogate, which is never loaded (nor downloaded)."""

    load_model = unsegment.models.load_model

    def refuse_surrogate(name, *args, **kwargs):  # vit_l, scored, loads; the surrogate vit_b not
        if name == "vit_b":
            raise AssertionError("the surrogate was loaded")
        return load_model(name, *args, **kwargs)

    monkeypatch.setattr(unsegment.models, "load_model", refuse_surrogate)
    out = tmp_path / "run"
    args = command(inputs, out, attacks=("noise",), models=("vit_l",), extra=["--images", "1000"])
    code, stdout, stderr = run(args)
    assert code == 1, stderr  # sa_2.jpg and sa_10.json are corrupt
    notes = [line for line in stderr.splitlines() if "--images" in line]
    assert notes == [
        f"warning: {inputs['sa1b']}: --images 1000, but it holds 4 SA-1B image(s) sa_N.jpg: "
        "taking those 4"
    ]
    assert "Traceback" not in stderr
    data = json.loads((out / "table.json").read_text())
    assert data["images"] == ["sa_1", "sa_11"] and data["encoder_passes"] == {"noise": [0, 0]}
    for name in ("sa_1", "sa_10", "sa_11"):
        clean = unsegment.images.read_image(inputs["sa1b"] / f"{name}.jpg").pixels.astype(int)
        saved = unsegment.images.read_image(out / "noise" / f"{name}.png").pixels.astype(int)
        assert 0 < np.abs(saved - clean).max() <= 8
    record = json.loads((out / "records" / "protect" / "noise" / "sa_1.json").read_text())
    assert record["feature_distance"] is None and record["key"]["surrogate"] is None


def test_cost_mode_prints_the_seconds_per_image_of_each_stage():
    code, stdout, stderr = run(
        ["--cost", "64x48", "--attacks", "aa", "--models", "vit_b", "--steps", "1", "--layers", "0"]
        + ["--points", "1", "--boxes", "1", "--max-masks", "1", "--device", "cpu"]
    )
    assert code == 0, stderr
    assert "steps: aa 1 PGD steps" in stdout
    assert "seconds per image, protect: aa " in stdout
    assert "seconds per image, score: vit_b " in stdout and "(clean " in stdout
    assert "seconds per image, whole pipeline: " in stdout


# -----------------------------------------------------------------------------------------------
# For reproduction: the authors' release, their AA's distance, their logs' prompts


@pytest.fixture(scope="module")
def authors_run(inputs, tmp_path_factory):
    """authors and aa released as the authors' code releases, aa with their L2 distance, scored
    on the prompts of a log folder in their format (UAD/ and AA/ of exp/log/benchmark): (run
    folder, log folder, exit code, stdout, stderr)."""
    root = tmp_path_factory.mktemp("authors_run")
    logs = root / "benchmark"
    for n in (1, 2, 10, 11):
        for seed, attack in enumerate(("UAD", "AA")):
            write_authors_log(logs / attack, n, attack, two_objects()[:1], seed=seed)
    out = root / "run"
    extra = ["--release", "authors", "--aa-distance", "l2", "--log-prompts", logs]
    return (out, logs, *run(command(inputs, out, ("authors", "aa"), ("vit_b",), extra)))


def test_the_authors_release_is_reported_with_its_l_inf(authors_run, inputs):
    out, _, code, stdout, stderr = authors_run
    assert code == 1, stderr  # sa_2 and sa_10 are corrupt, as in every run here
    for attack in ("authors", "aa"):
        record = json.loads((out / "records" / "protect" / attack / "sa_1.json").read_text())
        assert record["key"]["release"] == "authors"
        clean = unsegment.images.read_image(inputs["sa1b"] / "sa_1.jpg").pixels.astype(int)
        saved = unsegment.images.read_image(out / attack / "sa_1.png").pixels.astype(int)
        linf = int(np.abs(saved - clean).max())
        assert saved.shape == clean.shape and record["linf"] == linf > 0
        row = next(r for r in stdout.splitlines() if r.startswith(f"| {attack} | vit_b | "))
        assert row.endswith(f" | {cells(out)[(attack, 'vit_b', 'all')]['linf_max']}/255 |")
    assert (
        json.loads((out / "records" / "protect" / "aa" / "sa_1.json").read_text())["key"][
            "distance"
        ]
        == "l2"
    )
    assert "release: the authors' for every attack but noise (--release" in stdout
    assert "NOT within eps" in stdout
    assert "aa: L2, as theirs" in stdout and "prompts: their logs' (" in stdout


def test_each_row_is_scored_on_its_logs_prompts(authors_run):
    out, logs, code, stdout, stderr = authors_run
    scored = out / "records" / "score" / "vit_b"
    for variant, attack in (("clean", "UAD"), ("authors", "UAD"), ("aa", "AA")):
        record = json.loads((scored / variant / "sa_1.json").read_text())
        logged = json.loads((logs / attack / f"1_{attack}.json").read_text())["evaluations"]
        assert [c for _, _, c in record["prompts"]] == [e["prompt"] for e in logged.values()]
        # the aa row's prompts are not the clean image's: it was scored on them too
        assert ("clean_iou" in record) == (variant == "aa")
    table = cells(out)
    assert table[("aa", "vit_b", "all")]["count"] == table[("clean", "vit_b", "all")]["count"] == 8


def test_the_footer_says_what_differs_from_the_papers_evaluation(first_run):
    stdout = first_run[2]
    notes = stdout[stdout.index("what differs from the paper's evaluation") :]
    for text in (
        "release: ours,",
        "--release authors",
        "prompts: drawn from --seed",
        "--log-prompts",
    ):
        assert text in notes
    assert "FastSAM: BGR (--fastsam-rgb" in notes and "aa: 1 - cosine (theirs: L2" in notes


def test_a_missing_log_folder_is_one_line_before_any_model_loads(inputs, tmp_path):
    (tmp_path / "logs" / "UAD").mkdir(parents=True)
    extra = ["--log-prompts", tmp_path / "logs"]
    code, stdout, stderr = run(command(inputs, tmp_path / "run", ("authors", "aa"), extra=extra))
    assert code == 1 and stdout == "" and not (tmp_path / "run").exists()
    assert stderr == f"error: {tmp_path / 'logs' / 'AA'}: no such folder of the authors' logs\n"
