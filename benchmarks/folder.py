"""Images per minute in folder mode: uad.py on a folder, --batch 1 against --batch N.

    python benchmarks/folder.py [--device cuda] [--batch 4] [--images 4] [--preset paper ...]
        [--nproc N] [-- EXTRA UAD.PY FLAGS]

Writes --images copies of the astronaut photo at --size (each shifted, so that no two are
alike) and a random-init ViT-B checkpoint (the cost does not depend on the weights) into a
temporary folder, then runs uad.py's main on the folder for each preset with --batch 1 and with
--batch N, and prints the wall time of each run (loading the checkpoint
included) and the images per minute. The protected files of both runs are compared: they must
be the same bytes.

--nproc N compares instead one process against N under torchrun (docs/scale.md): on a CPU, one
process of N threads against N processes of one thread each; on GPUs (--device cuda), one GPU
against N, one process each. The times include starting the processes and loading the
checkpoint in each; the files are compared too (on a CPU, N threads may round a reduction
differently from one, so they may differ by a grey level there).
"""

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
import unsegment.cli
import unsegment.models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=1024, help="side of each (square) photo")
    p.add_argument("--preset", nargs="+", default=["no-fidelity", "paper"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--nproc", type=int, default=0, metavar="N", help="1 process against N")
    p.add_argument("extra", nargs="*", help="more uad.py flags, after --")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        with Image.open(ROOT / "examples" / "astronaut.png") as im:
            photo = np.asarray(im.convert("RGB").resize((args.size, args.size)))
        for i in range(args.images):
            Image.fromarray(np.roll(photo, 17 * i, axis=1)).save(tmp / "in" / f"{i:03d}.png")
        torch.manual_seed(0)
        torch.save(unsegment.models.build_sam("vit_b").state_dict(), tmp / "sam.pth")
        device = unsegment.models.resolve_device(args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(
            f"uad.py on {args.images} images of {args.size}x{args.size}, {device} ({name}), "
            f"random-init vit_b, flags {' '.join(args.extra) or '(none)'}",
            flush=True,
        )
        if args.nproc:
            return processes(args, tmp)
        status = 0
        for preset in args.preset:
            seconds, files = {}, {}
            for batch in (1, args.batch):
                out = tmp / f"out-{preset}-{batch}"
                argv = [str(tmp / "in"), str(out), "--preset", preset, "--batch", str(batch)]
                argv += ["--checkpoint", str(tmp / "sam.pth"), "--device", args.device, "--quiet"]
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    code = unsegment.cli.main(argv + args.extra)
                seconds[batch] = time.perf_counter() - start
                if code != 0:
                    print(f"{preset} --batch {batch}: uad.py exited {code}")
                    return 1
                files[batch] = [f.read_bytes() for f in sorted(out.iterdir())]
            same = files[1] == files[args.batch]
            status |= not same
            print(
                f"{preset}: --batch 1 {seconds[1]:.1f} s ({60 * args.images / seconds[1]:.2f} "
                f"images/min), --batch {args.batch} {seconds[args.batch]:.1f} s "
                f"({60 * args.images / seconds[args.batch]:.2f} images/min), "
                f"{seconds[1] / seconds[args.batch]:.2f}x; files "
                + ("identical" if same else "DIFFER"),
                flush=True,
            )
    return status


def processes(args, tmp: Path) -> int:
    """--nproc N: uad.py on the folder in one process, then in N under torchrun."""
    cpu = unsegment.models.resolve_device(args.device).type == "cpu"
    for preset in args.preset:
        argv = ["--preset", preset, "--checkpoint", str(tmp / "sam.pth"), "--device", args.device]
        argv += ["--quiet", *args.extra]
        one, many = tmp / f"one-{preset}", tmp / f"many-{preset}"
        torch.set_num_threads(args.nproc if cpu else args.threads)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = unsegment.cli.main([str(tmp / "in"), str(one), *argv])
        seconds_one = time.perf_counter() - start
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(args.nproc), str(ROOT / "uad.py")]
        start = time.perf_counter()
        done = subprocess.run(
            command + [str(tmp / "in"), str(many), *argv], capture_output=True, text=True, env=env
        )
        seconds_many = time.perf_counter() - start
        if code != 0 or done.returncode != 0:
            print(f"{preset}: uad.py exited {code}, under torchrun {done.returncode}")
            print(done.stderr[-2000:])
            return 1
        same = [f.read_bytes() for f in sorted(one.iterdir())] == [
            f.read_bytes() for f in sorted(many.iterdir())
        ]
        rate = lambda s: f"{s:.1f} s ({60 * args.images / s:.2f} images/min)"  # noqa: E731
        threads = lambda n: f" x {n} thread{'s' * (n > 1)}" if cpu else ""  # noqa: E731
        print(
            f"{preset}: 1 process{threads(args.nproc)} {rate(seconds_one)}, {args.nproc} "
            f"processes{threads(1)} {rate(seconds_many)}, {seconds_one / seconds_many:.2f}x; "
            "files " + ("identical" if same else "differ"),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
