"""One run over several processes (unsegment.distributed): torchrun with the gloo group on CPU
and --shard K/N give what one process gives, byte for byte and cell for cell; --resume keeps
complete outputs and redoes the rest; the summary counts every process's images once.

torchrun runs tests/launch.py (the tiny model shapes) in 2 processes of one thread each, pinned
to at most 2 CPUs, so that they compute what this process computes with its one thread.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import unsegment.cli
import unsegment.progress
from helpers import ROOT, save, small_photo, two_objects, write_annotations
from helpers import build_tiny_sam
from test_reproduce import FAST as REPRODUCE_FAST
from test_reproduce import make_sa1b
from test_reproduce import run as reproduce_in_process
from unsegment import distributed
from unsegment.distributed import Share

FAST = ["--preset", "reference", "--steps", "2", "--deform-steps", "1"]
EVAL_FAST = ["--points", "2", "--boxes", "1", "--max-masks", "2", "--quiet"]


def torchrun(*args, nproc=2, timeout=900):
    """tests/launch.py ARGS under torchrun: (exit code, stdout, stderr)."""
    cpus = sorted(os.sched_getaffinity(0))[:nproc]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), str(ROOT / "tests" / "launch.py")]
    done = subprocess.run(
        cmd + [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # one core per process, as here
    )
    return done.returncode, done.stdout, done.stderr


def errors(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# -----------------------------------------------------------------------------------------------
# The split rule


def test_image_i_goes_to_share_i_mod_n_and_every_image_to_exactly_one():
    items = list(range(23))
    for shards, world in [(1, 1), (1, 2), (3, 1), (2, 3)]:
        taken = {}
        for k in range(shards):
            for rank in range(world):
                share = Share((k, shards), rank, world)
                for i in share.take(items):
                    taken.setdefault(i, []).append(k + shards * rank)
        assert sorted(taken) == items and all(len(v) == 1 for v in taken.values())
        assert all(v[0] == i % (shards * world) for i, v in taken.items())
    assert Share((1, 2), 1, 2).tag() == "shard 1/2 rank 1/2: " and Share().tag() == ""


def test_the_share_comes_from_torchruns_environment_or_shard():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    share = distributed.share_of(None, env)
    assert (share.rank, share.world, share.local_rank, share.group, share.main) == (
        3,
        4,
        1,
        True,
        False,
    )
    assert unsegment.progress.process_tag(env) == "rank 3/4: " == share.tag()
    assert distributed.share_of((2, 5), {}) == Share((2, 5))
    assert not distributed.share_of(None, {}).split and distributed.share_of((0, 2), {}).split
    with pytest.raises(unsegment.cli.UADError, match="not a rank"):
        distributed.share_of(None, {"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(unsegment.cli.UADError, match="not whole numbers"):
        distributed.share_of(None, {"RANK": "x"})
    if not torch.cuda.is_available():  # auto stays auto: CPU
        assert distributed.device_name(share, "auto") == "auto"
    assert distributed.device_name(share, "cpu") == "cpu"


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_a_bad_shard_is_one_line(cli, tmp_path, text, no_model):
    Image.fromarray(small_photo()).save(tmp_path / "in.png")
    code, out, err = cli(tmp_path / "in.png", tmp_path / "out.png", f"--shard={text}")
    assert code == 2 and out == "" and err.count("\n") == 1 and "K/N with 0 <= K < N" in err


# -----------------------------------------------------------------------------------------------
# uad.py's folder mode


@pytest.fixture
def folder(tmp_path):
    """IN with three photos and one file that is no image (b.png)."""
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(("a.png", "c.png", "d.png")):
        Image.fromarray(np.roll(small_photo(), 11 * i, axis=1)).save(src / name)
    (src / "b.png").write_bytes(b"not an image at all")
    return src


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_torchrun_writes_what_one_process_writes_and_counts_every_image_once(
    cli, folder, tmp_path, tiny_checkpoints
):
    code, out, err = cli(folder, tmp_path / "one", *FAST, "--quiet")
    assert code == 1 and "3 protected, 1 failed" in out, err
    code, out, err = torchrun(
        "uad", folder, tmp_path / "two", *FAST, "--checkpoint", tiny_checkpoints["vit_b"]
    )
    assert code != 0, err  # b.png
    assert files(tmp_path / "two") == files(tmp_path / "one")  # byte for byte
    for name in ("a.png", "c.png", "d.png"):  # each image protected once, by one rank
        assert out.count(f"{tmp_path / 'two' / name}: L-inf") == 1, out
    assert out.count("protected, ") == 1 and "3 protected, 1 failed" in out
    assert errors(err) == [f"error: {folder / 'b.png'}: not an image file that PIL can read"]
    assert "rank 0/2: " in err and "rank 1/2: " in err  # progress names the rank
    assert err.count("unsegment: preset reference") == 1  # the header, once


def test_shards_then_resume_equal_one_process(cli, folder, tmp_path):
    code, out, err = cli(folder, tmp_path / "one", *FAST, "--quiet")
    assert code == 1
    out_dir = tmp_path / "sharded"
    code, out, err = cli(folder, out_dir, *FAST, "--shard", "0/2")  # a.png, c.png
    assert code == 0 and "shard 0/2: 2 protected, 0 failed" in out
    assert "shard 0/2: " in err and sorted(files(out_dir)) == ["a.png", "c.png"]
    code, out, err = cli(folder, out_dir, *FAST, "--shard", "1/2", "--quiet")  # b.png, d.png
    assert code == 1 and "shard 1/2: 1 protected, 1 failed" in out
    assert files(out_dir) == files(tmp_path / "one")
    # the whole folder again: what is there is kept, b.png fails again, nothing is redone
    code, out, err = cli(folder, out_dir, *FAST, "--resume", "--quiet", checkpoint=None)
    assert code == 1 and "3 protected, 1 failed (3 of them kept from an earlier run)" in out
    assert out.count("kept, protected by an earlier run") == 3 and "L-inf" not in out


def test_resume_keeps_complete_outputs_only(cli, folder, tmp_path):
    (folder / "b.png").unlink()
    out_dir = tmp_path / "out"
    assert cli(folder, out_dir, *FAST, "--quiet")[0] == 0
    kept = files(out_dir)
    code, out, err = cli(folder, out_dir, *FAST, "--quiet")  # without --resume: an error each
    assert code == 1 and err.count("exists; pass --overwrite") == 3
    assert errors(err)[-1] == f"error: {folder}: none of its 3 image(s) can be protected"
    (out_dir / "a.png").unlink()  # never written: protected now
    data = (out_dir / "c.png").read_bytes()
    (out_dir / "c.png").write_bytes(data[: len(data) // 2])  # not ours: truncated
    Image.open(folder / "d.png").save(out_dir / "d.png")  # not ours: the input unchanged
    code, out, err = cli(folder, out_dir, *FAST, "--resume")
    assert code == 1 and "1 protected, 2 failed" in out
    assert [line.split(": ")[1] for line in errors(err)] == [
        str(out_dir / "c.png"),
        str(out_dir / "d.png"),
    ]
    assert "truncated or corrupt" in err and "is its input" in err and "--overwrite" in err
    assert (out_dir / "a.png").read_bytes() == kept["a.png"]
    code, out, err = cli(folder, out_dir, *FAST, "--resume", "--overwrite", "--quiet")
    assert code == 0 and "3 protected, 0 failed" in out and files(out_dir) == kept


# -----------------------------------------------------------------------------------------------
# eval.py


@pytest.fixture
def scored(tmp_path):
    """(clean folder, adversarial folder, annotation folder): 3 pairs, and an adversarial twin
    that does not decode (b.png)."""
    clean, adv, anns = tmp_path / "clean", tmp_path / "adv", tmp_path / "anns"
    for i, name in enumerate(("a", "b", "c", "d")):
        pixels = np.roll(small_photo(), 9 * i, axis=1)
        save(clean / f"{name}.png", pixels)
        noise = np.random.default_rng(i).integers(-8, 9, pixels.shape)
        save(adv / f"{name}.png", np.clip(pixels + noise, 0, 255).astype(np.uint8))
        write_annotations(anns / f"{name}.json", two_objects())
    (adv / "b.png").write_bytes(b"not an image")
    return clean, adv, anns


def without_seconds(obj):
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def csv_without_seconds(text: str) -> list:
    return [line.rsplit(",", 1)[0] for line in text.splitlines()]


def eval_args(scored, out: Path, checkpoint) -> list:
    clean, adv, anns = scored
    return [
        *("--clean", clean, "--adv", adv, "--annotations", anns, *EVAL_FAST),
        *("--models", f"vit_b={checkpoint}", "--out", out / "r.json", "--csv", out / "r.csv"),
    ]


def run_eval(args, capsys):
    code = ev.main([str(a) for a in args])
    return (code, *capsys.readouterr())


def results(out: Path):
    data = json.loads((out / "r.json").read_text())
    return without_seconds(data), csv_without_seconds((out / "r.csv").read_text())


def test_eval_under_torchrun_writes_the_single_process_results(
    scored, tmp_path, tiny_archs, tiny_checkpoints, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    args = eval_args(scored, out, tiny_checkpoints["vit_b"])
    code, stdout, stderr = run_eval(args, capsys)
    assert code == 1 and "3 image(s) scored, 1 failed" in stdout, stderr
    one = results(out)
    for p in out.iterdir():
        p.unlink()
    code, stdout, stderr = torchrun("eval", *args)
    assert code != 0 and stdout.count("3 image(s) scored, 1 failed") == 1, stderr
    assert results(out) == one
    lines = errors(stderr)  # the pair, by rank 1; then the count, by rank 0
    assert len(lines) == 2 and sum(str(scored[1] / "b.png") in line for line in lines) == 1
    assert "1 image(s) not scored" in stderr


def test_eval_shards_then_a_plain_run_equal_one_process(
    scored, tmp_path, tiny_archs, tiny_checkpoints, capsys, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    args = eval_args(scored, out, tiny_checkpoints["vit_b"])
    assert run_eval(args, capsys)[0] == 1
    one = results(out)
    for p in out.iterdir():
        p.unlink()
    records = ["--records", tmp_path / "records"]
    code, stdout, stderr = run_eval([*args, *records, "--shard", "0/2"], capsys)  # a, c
    assert code == 0 and "shard 0/2: 2 image(s) scored" in stdout and "0 failed" in stdout
    assert not (out / "r.json").exists()  # a shard writes its records only
    code, stdout, stderr = run_eval([*args, *records, "--shard", "1/2"], capsys)  # b, d
    assert code == 1 and "shard 1/2: 1 image(s) scored" in stdout and "1 failed" in stdout
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [
        "a.png.json",
        "c.png.json",
        "d.png.json",
    ]
    scored_again = []
    monkeypatch.setattr(ev, "score_pair", lambda *a: scored_again.append(a))
    code, stdout, stderr = run_eval([*args, *records], capsys)
    assert code == 1 and "3 image(s) scored, 1 failed" in stdout
    assert scored_again == [] and results(out) == one  # summed from the records alone
    code, _, stderr = run_eval([*args, "--shard", "0/2"], capsys)
    assert code == 1 and "--shard needs --records DIR" in stderr


def test_eval_records_keep_every_probe_and_a_report_draws_what_records_lack(
    scored, tmp_path, tiny_archs, tiny_checkpoints, capsys, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    args = [*eval_args(scored, out, tiny_checkpoints["vit_b"]), "--probes", "none,blur:1"]
    assert run_eval(args, capsys)[0] == 1
    one = results(out)
    assert set(one[0]["images"][0]["probes"]) == {"none", "blur:1"}
    records = ["--records", tmp_path / "records"]
    assert run_eval([*args, *records], capsys)[0] == 1  # scores every pair into the records
    real_score_pair, scored_again = ev.score_pair, []

    def score_pair(pair, *rest):
        scored_again.append(pair.clean.name)
        return real_score_pair(pair, *rest)

    monkeypatch.setattr(ev, "score_pair", score_pair)
    assert run_eval([*args, *records], capsys)[0] == 1
    assert scored_again == [] and results(out) == one  # every probe's scores from the records
    report = ["--report", tmp_path / "report"]
    assert run_eval([*args, *records, *report], capsys)[0] == 1
    assert sorted(scored_again) == ["a.png", "c.png", "d.png"]  # no picture yet: scored again
    assert results(out) == one
    assert run_eval([*args, *records, *report], capsys)[0] == 1
    assert len(scored_again) == 3  # pictures and records both there


# -----------------------------------------------------------------------------------------------
# benchmarks/reproduce.py


@pytest.fixture(scope="module")
def sa1b(tmp_path_factory):
    """test_reproduce.py's SA-1B-like folder (sa_2 corrupt, sa_10 unscorable) and a tiny vit_b."""
    root = tmp_path_factory.mktemp("sa1b")
    torch.save(build_tiny_sam("vit_b").state_dict(), root / "vit_b.pth")
    return make_sa1b(root / "sa1b"), root / "vit_b.pth"


def reproduce_args(sa1b, out: Path) -> list:
    folder, checkpoint = sa1b
    fast = [a for a in REPRODUCE_FAST]
    fast[fast.index("--images") + 1] = "4"
    return [
        *(
            "--sa1b",
            folder,
            "--out",
            out,
            "--attacks",
            "aa,noise",
            "--models",
            f"vit_b={checkpoint}",
        ),
        *("--surrogate-checkpoint", checkpoint, *fast),
    ]


def run_reproduce(args) -> int:
    return reproduce_in_process(args)[0]


def table(out: Path) -> dict:
    data = json.loads((out / "table.json").read_text())
    return {k: data[k] for k in ("images", "failures", "table", "quality")}


def stamps(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def one_process(sa1b, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert run_reproduce(reproduce_args(sa1b, out)) == 1  # sa_2 and sa_10
    return table(out)


def test_reproduce_rank_killed_then_rerun_redoes_its_work_only_and_gives_the_table(
    sa1b, one_process, tmp_path
):
    """torchrun with 2 ranks: rank 1 (sa_10) dies once its first image is recorded, and torchrun
    stops rank 0; the rerun, under torchrun again, protects and scores only what is missing."""
    out = tmp_path / "run"
    args = reproduce_args(sa1b, out)
    code, stdout, stderr = torchrun("--die-after-first-image", "1", "reproduce", *args)
    assert code != 0 and "rank 1 dies after: protected aa/sa_10.png" in stdout, stderr
    recorded = sorted((out / "records" / "protect").rglob("*.json"))
    assert out / "records" / "protect" / "aa" / "sa_10.json" in recorded
    assert out / "records" / "protect" / "noise" / "sa_10.json" not in recorded
    before = stamps(out / "records")
    code, stdout, stderr = torchrun("reproduce", *args)
    assert code == 1, stderr  # sa_2 and sa_10's annotations
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing redone
    # each rank protects what it lacks: rank 1 noise/sa_10 at least, and no image twice
    lines = [line for line in stdout.splitlines() if line.startswith("protected ")]
    assert "protected noise/sa_10.png" in "\n".join(lines) and len(lines) == len(set(lines))
    assert len(lines) == 6 - len(recorded)  # 2 attacks x 3 usable images
    assert table(out) == one_process
    assert stdout.count("wrote ") == 1  # one table, by rank 0


def test_reproduce_shards_then_a_plain_run_give_the_table(sa1b, one_process, tmp_path):
    out = tmp_path / "run"
    args = reproduce_args(sa1b, out)
    assert run_reproduce([*args, "--shard", "0/2"]) == 1  # sa_1, sa_11; sa_2 is bad for all
    assert not (out / "table.json").exists()
    assert run_reproduce([*args, "--shard", "1/2"]) == 1  # sa_10: its annotations
    before = stamps(out)
    assert run_reproduce(args) == 1
    changed = {p for p, t in stamps(out).items() if before.get(p) != t}
    assert changed == {out / "table.json", out / "table.csv"}  # the table from the records
    assert table(out) == one_process
