"""One run over several processes: torchrun's process group, or --shard K/N without one.

    torchrun --nproc-per-node 8 uad.py IN_DIR OUT_DIR        (one process per GPU)
    python uad.py IN_DIR OUT_DIR --shard 3/8                 (a Slurm array task, a machine...)

uad.py's folder mode, eval.py and benchmarks/reproduce.py split their images by one fixed rule:
image i of the sorted list goes to share i mod N (--shard K/N takes share K; under torchrun, rank
r of a world of N takes share r; both together split shard K among the ranks). Each image is
worked on whole by one process and drawn from its own generator (uad.generators), so the union
of the shares is what one process writes, byte for byte, on the same device type and threads.

Under torchrun each process takes cuda:LOCAL_RANK (for --device auto or cuda), or on a CPU its
share of the cores, and the processes meet once, at the end, to sum their counts: rank 0 prints
the one summary. The group runs gloo whatever the device: it carries a few Python objects once
per run, and a rank may wait hours there for a slower one, which NCCL's watchdog would abort.
"""

import argparse
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from uad import UADError

# how long a rank that is done waits for the others at the end (a share can take days)
WAIT = datetime.timedelta(days=7)


def shard(text: str) -> Tuple[int, int]:
    """--shard K/N: this process takes images K, K + N, K + 2N, ... (0 <= K < N)."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N, e.g. 0/4")
    return k, n


@dataclass(frozen=True)
class Share:
    """Which images this process takes, and whom it meets at the end."""

    shard: Tuple[int, int] = (0, 1)  # --shard K/N
    rank: int = 0  # torchrun's RANK, in a world of `world` processes
    world: int = 1
    local_rank: int = 0  # LOCAL_RANK: the process's GPU on its machine
    local_world: int = 1  # processes on this machine

    @property
    def group(self) -> bool:
        """Whether a process group joins this process to others (torchrun with N > 1)."""
        return self.world > 1

    @property
    def split(self) -> bool:
        """Whether this process takes less than all of the images."""
        return self.group or self.shard[1] > 1

    @property
    def main(self) -> bool:
        """The process that prints what is said once (header, summary, table)."""
        return self.rank == 0

    def take(self, items: Sequence) -> list:
        """This process's items of a sorted list: item i when i mod N is its share."""
        k, n = self.shard
        return list(items)[k::n][self.rank :: self.world]

    def tag(self) -> str:
        """How progress lines name this process: "rank 1/4: ", "shard 2/8: ", or ""."""
        parts = [f"shard {self.shard[0]}/{self.shard[1]}"] * (self.shard[1] > 1)
        parts += [f"rank {self.rank}/{self.world}"] * self.group
        return " ".join(parts) + ": " if parts else ""

    def collect(self, value: Any) -> Optional[List[Any]]:
        """Every rank's `value` in rank order on rank 0 (None on the others); [value] without a
        group. Every rank must call it."""
        if not self.group:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world if self.main else None
        dist.gather_object(value, values, dst=0)
        return values

    def total(self, counts: Sequence[int]) -> List[int]:
        """`counts` summed over the ranks, on every rank. Every rank must call it."""
        if not self.group:
            return list(counts)
        import torch.distributed as dist

        t = torch.tensor(list(counts), dtype=torch.int64)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        """Waits for every rank, then leaves the group (nothing without one)."""
        if self.group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def share_of(shard: Optional[Tuple[int, int]] = None, env=os.environ) -> Share:
    """This process's share: from --shard and from torchrun's RANK, WORLD_SIZE, LOCAL_RANK and
    LOCAL_WORLD_SIZE (absent: one process)."""
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local_rank = int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    except ValueError:
        raise UADError(
            "RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE: not whole numbers"
        ) from None
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise UADError(f"RANK {rank} of WORLD_SIZE {world}: not a rank of that world")
    return Share(shard or (0, 1), rank, world, local_rank, local_world)


def device_name(share: Share, requested: str) -> str:
    """--device under torchrun: auto and cuda become cuda:LOCAL_RANK where CUDA is available;
    anything else (cpu, cuda:N, mps) is taken as given."""
    if share.group and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{share.local_rank}"
    return requested


def start(share: Share, device: torch.device) -> None:
    """Joins the process group (under torchrun with N > 1; nothing otherwise); on a CPU, gives
    this process its share of the cores, unless OMP_NUM_THREADS asks for another number than
    the 1 that torchrun sets."""
    if not share.group:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "cpu" and os.environ.get("OMP_NUM_THREADS", "1") == "1":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        torch.set_num_threads(max(1, (cores or os.cpu_count() or 1) // share.local_world))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=WAIT)


# -----------------------------------------------------------------------------------------------
# Per-image records: what each share found, in files of their own, for the run that sums them


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(path: Path, key: dict) -> Optional[dict]:
    """The value recorded at `path` if the file parses and was made with `key` (compared as
    JSON reads it back); else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("key") != json.loads(json.dumps(key)):
        return None
    return record.get("value")


def write_record(path: Path, key: dict, value) -> None:
    """Records `value` made with `key` at `path`, whole or not at all (write_atomically)."""
    from unsegment.images import write_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UADError(f"{path.parent}: cannot create the folder ({e.strerror})") from None
    record = {"key": key, "value": value}
    write_atomically(path, json.dumps(record, indent=1, allow_nan=False).encode("utf-8"))
