"""Progress: one status line on stderr for both command lines (uad.py and eval.py)."""

import math
import os
import sys
import time
from typing import Optional


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def process_tag(env=os.environ) -> str:
    """How status lines name a process that torchrun started among others: "rank 1/4: " (its
    RANK of WORLD_SIZE); "" in a process on its own."""
    world = env.get("WORLD_SIZE", "1")
    return f"rank {env.get('RANK', '0')}/{world}: " if world not in ("", "1") else ""


class Progress:
    """Status lines on stderr: redrawn in place on a terminal; in a log file, a line every 10%
    of a stage. `item` names the file being worked on (with an ETA over the files); calling the
    object reports a stage's steps (the attack's progress callback); `error` prints a message
    without breaking a redrawn line. `tag` starts every status line: which process of a run
    split over several prints it (process_tag; uad.py's adds its --shard)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet, self.stream, self.tag = quiet, stream or sys.stderr, process_tag()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.prefix, self.open = "", False
        self.stage, self.started, self.shown = None, 0.0, -1
        self.items_started = time.monotonic()

    def item(self, index: int, total: int, name: str, count: int = 1) -> None:
        """Starts item `index` (0-based) of `total`, named `name`; or `count` items at once."""
        items = f"{index + 1}" if count == 1 else f"{index + 1}-{index + count}"
        self.prefix = f"[{items}/{total}] {name}" if total > 1 else name
        line = self.prefix
        if index == 0:  # the pace counts from the first item, not from loading the models
            self.items_started = time.monotonic()
        else:
            per_item = (time.monotonic() - self.items_started) / index
            line += f"  {per_item:.1f} s/image, ETA {format_duration(per_item * (total - index))}"
        self.stage = None
        self._show(line, final=not self.tty)

    def __call__(self, stage: str, step: int, total: int, loss: Optional[float] = None) -> None:
        now = time.monotonic()
        if stage != self.stage or step == 0:
            self.stage, self.started, self.shown = stage, now, -1
        if step == 0:
            return
        eta = (now - self.started) / step * (total - step)
        line = f"{self.prefix}: " if self.prefix else ""
        line += f"{stage} {step}/{total}" + (f" loss {loss:+.4f}" if loss is not None else "")
        line += f" eta {format_duration(eta)}"
        if self.tty:
            self._show(line, final=False)
        elif step == total or step * 10 // total > self.shown:
            self.shown = step * 10 // total
            self._show(line, final=True)

    def _show(self, line: str, final: bool) -> None:
        if self.quiet:
            return
        line = self.tag + line
        if self.tty:
            print(f"\r{line[:99]:<99}", end="", file=self.stream, flush=True)
            self.open = True
        elif final:
            print(line, file=self.stream, flush=True)

    def error(self, message: str) -> None:
        self.end()
        print(f"error: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.end()
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.open:
            print(file=self.stream, flush=True)
            self.open = False
