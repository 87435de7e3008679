"""Golden bytes: a fixed set of small seeded runs writes exactly the files it wrote when the
hashes below were recorded, so a change that only moves code cannot change what is computed
(they held 20df612's bytes through the split of uad.py into the method and the `unsegment`
package; a change meant to alter the output records them anew, saying why).

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

GOLDEN = {  # platform_key() -> {run: SHA-256 of what it writes}
    # 20df612's bytes held through the split into uad.py and unsegment/; recorded anew when each
    # image's draws came to mix in its own values (uad.generators), which moves every run but aa's
    "torch 2.14.1 / Intel(R) Xeon(R) Processor / avx512": {
        "paper": "df112647d311644297c1c4c505a28b47b7da0f224cb2b555490358581bd01e37",
        "no-fidelity": "12a3832ff3dc4e0470a22e4c40f52622a0a5a0f32eff9415962971cff94953e5",
        "aa": "7560d296693d05e5714f46099f529e674b3ad46d51214480d42912ee3e843a61",
        "noise": "b089b2e295336f36305138c6184dff1323095f85269270298b7ceeac5bdf1abc",
        "robust": "712b2ce025ed0264a4f9edbff2e43f394c2f5278c227ecabd7fd403d9dfb0b31",
        "momentum-random-start": "3691458f6139ff7cf299e256e77bc5b0fb1d3415816d90f84be0d5e15a49ad3d",
        "ensemble": "08f85fe9aafd30a61ba334c3e92499348cb435cc50d62cf23cf62206f45dd6ac",
        "folder/a.png": "12a3832ff3dc4e0470a22e4c40f52622a0a5a0f32eff9415962971cff94953e5",
        "folder/b.png": "643c41b24758d7dfc65d513a4f4edd2fb703d3ff61a4c839965f74fa75200d0b",
        "protect-uint8": "c046214cd4836dd2e9af712ee0861b66b9945965154d6c391039300bf3882bff",
        "protect-tensor": "5cf71d4ea5dd022de5069106489e139db76f40fc110cbd224ee743921c84f6d6",
        "authors": "2adbec0289af0397b4dc26efec6ae02b6e856b97f7c6e5dc17092d11a4c7ae2f",
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
