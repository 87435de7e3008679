"""Golden bytes: a fixed set of small seeded runs writes exactly the files it wrote when the
hashes below were recorded (at 20df612, before uad.py was split into the method and the
`unsegment` package), so a change that moves code cannot change what is computed.

Floating-point results depend on the CPU's vector width and on the torch build, so the hashes
hold for the machine kind they were recorded on (the keys of GOLDEN); elsewhere the test skips and
says so. `GOLDEN_RECORD=1 python -m pytest -s tests/test_golden.py` prints this machine's key and
hashes instead, to record them at a commit whose output is trusted.
"""

import hashlib
import os
import platform
import shutil

import pytest
import torch
from PIL import Image

import uad
from unsegment import authors
from helpers import EXAMPLES, small_photo

FAST = ["--steps", "2", "--deform-steps", "2", "--proxy-steps", "1", "--quiet"]

# name -> uad.py arguments after IN OUT (the tiny vit_b checkpoint is added by the cli fixture)
CLI_RUNS = {
    "paper": ["--preset", "paper", *FAST],
    "no-fidelity": ["--preset", "no-fidelity", *FAST],
    "aa": ["--preset", "aa", "--target-image", "{target}", *FAST],
    "noise": ["--preset", "noise", "--quiet"],
    "robust": ["--preset", "no-fidelity", "--robust", "jpeg:60-90,resize:0.5-1", *FAST],
    "momentum-random-start": ["--momentum", "1", "--random-start", "--seed", "3", *FAST],
}

GOLDEN = {  # platform_key() -> {run: SHA-256 of what it writes}, recorded at 20df612
    "torch 2.14.1 / Intel(R) Xeon(R) Processor / avx512": {
        "paper": "0bc9c074aa4b98e05acaed15e6602e479d699353f72f561836a8766b729b7f3c",
        "no-fidelity": "e387403ce3372b97f9b0021b31232e032ca8c7288f201feaa9f8c410efcb70b9",
        "aa": "7560d296693d05e5714f46099f529e674b3ad46d51214480d42912ee3e843a61",
        "noise": "67caf4ac928f33e3057340960d000ed526be721dd70df7e339f147ccedc52819",
        "robust": "42639099f7f3b695eda51b8ffd6708e408d5bc8fed549432f039819bc64e1de7",
        "momentum-random-start": "7f6295088bd04e85509b40f378e0230b45debbd02619bff4b87278933d476daf",
        "ensemble": "983efb48cb360c8f2f481003efb820d380524527a9c623ceaa6fe0be8c10dda4",
        "folder/a.png": "e387403ce3372b97f9b0021b31232e032ca8c7288f201feaa9f8c410efcb70b9",
        "folder/b.png": "d167507826d8e285a18f7d1b478a7a8464fd6b2dd1c2d1edc4b0326e3cb8a780",
        "protect-uint8": "8fafa04c51a1fafb67d031746ff59bdf9cbb30f906f525d2f8905b75bedfba32",
        "protect-tensor": "43dddcceb936af177baa53a08f5f02ae8cb8ef8c8059334ab4edd4b3ae945971",
        "authors": "5aaebae6be4f6a84dac633f563a6b77a58e68ad35053086af234bd22d83ae53c",
    },
}


def platform_key() -> str:
    """torch's version and the CPU's model and widest vector instructions."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", "x86_64"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return f"torch {torch.__version__.split('+')[0]} / {name} / {isa}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli_hashes(cli, checkpoints, folder) -> dict:
    """name -> SHA-256 of the file each CLI run writes (folder mode: of each file)."""
    src = folder / "coffee.png"
    shutil.copy(EXAMPLES / "coffee.png", src)
    target = folder / "target.png"
    Image.fromarray(small_photo((600, 400))).save(target)
    hashes = {}
    for name, args in CLI_RUNS.items():
        out = folder / f"{name}.png"
        code, _, err = cli(src, out, *(a.format(target=target) for a in args))
        assert code == 0, err
        hashes[name] = sha(out.read_bytes())
    # an ensemble of two tiny SAMs, through --surrogate
    code, _, err = cli(
        src,
        folder / "ensemble.png",
        "--surrogate",
        f"vit_b={checkpoints['vit_b']},vit_l={checkpoints['vit_l']}",
        "--preset",
        "no-fidelity",
        *FAST,
        checkpoint=None,
    )
    assert code == 0, err
    hashes["ensemble"] = sha((folder / "ensemble.png").read_bytes())
    # folder mode, two images of one size in one batch
    images, protected = folder / "in", folder / "out"
    images.mkdir()
    shutil.copy(src, images / "a.png")
    Image.fromarray(small_photo((600, 400))).save(images / "b.png")
    code, _, err = cli(images, protected, "--batch", "2", "--preset", "no-fidelity", *FAST)
    assert code == 0, err
    for p in sorted(protected.iterdir()):
        hashes[f"folder/{p.name}"] = sha(p.read_bytes())
    return hashes


def library_hashes(sam) -> dict:
    """name -> SHA-256 of what the library returns: uint8 pixels, a float tensor, the authors'
    attack."""
    pixels = small_photo((96, 64))
    config = uad.UADConfig(steps=2, deform_steps=2, proxy_steps=1)
    hashes = {"protect-uint8": sha(uad.protect(pixels, sam, config=config).tobytes())}
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    adv = uad.protect(x, sam, config=uad.preset_config("no-fidelity", steps=2, deform_steps=2))
    hashes["protect-tensor"] = sha(adv.numpy().tobytes())
    config = authors.authors_config(steps=2, deform_steps=2)
    adv = authors.attack(x, sam, config).adv
    hashes["authors"] = sha(uad.quantize(adv, x, config.eps).numpy().tobytes())
    return hashes


def test_the_same_runs_write_the_same_bytes(cli, tiny_checkpoints, tiny_sam, tmp_path):
    key = platform_key()
    if os.environ.get("GOLDEN_RECORD"):
        got = {**cli_hashes(cli, tiny_checkpoints, tmp_path), **library_hashes(tiny_sam)}
        print(f"\n    {key!r}: {{")
        for name, digest in got.items():
            print(f"        {name!r}: {digest!r},")
        print("    },")
        return
    if key not in GOLDEN:
        pytest.skip(f"golden bytes recorded on {', '.join(GOLDEN)}, not on {key}")
    got = {**cli_hashes(cli, tiny_checkpoints, tmp_path), **library_hashes(tiny_sam)}
    assert got == GOLDEN[key]
