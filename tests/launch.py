"""A command line of the project on the tests' tiny model shapes, for tests that start processes
of their own (torchrun's workers cannot be patched from the test):

    python -m torch.distributed.run --nproc-per-node 2 tests/launch.py uad IN OUT ...
    python tests/launch.py eval ... | reproduce ... [--die-after-first-image RANK]

unsegment.models.SAM_ARCHS takes helpers.TINY_ARCHS (vit_l with vit_b's shape, as
test_reproduce.py has it), and the repository comes first on sys.path, not an installed copy.
--die-after-first-image RANK (reproduce only, before its arguments): that rank kills itself with
SIGKILL once its first protected image is recorded, as a crash would.
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import unsegment.models  # noqa: E402
from helpers import TINY_ARCHS, load_script  # noqa: E402

unsegment.models.SAM_ARCHS = {**TINY_ARCHS, "vit_l": TINY_ARCHS["vit_b"]}


def main(argv) -> int:
    die = None
    if argv[:1] == ["--die-after-first-image"]:
        die, argv = int(argv[1]), argv[2:]
    command, args = argv[0], argv[1:]
    if command == "uad":
        import unsegment.cli

        return unsegment.cli.run(args)
    if command == "eval":
        import eval

        return eval.main(args)
    reproduce = load_script("benchmarks/reproduce.py")
    if die is not None and int(os.environ.get("RANK", 0)) == die:
        protect_one = reproduce.protect_one

        def first_then_die(*a):
            line = protect_one(*a)
            print(f"rank {die} dies after: {line}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        reproduce.protect_one = first_then_die
    return reproduce.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
