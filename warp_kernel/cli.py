"""Argument parsing shared by `python -m warp_kernel.bench`, `.check` and `.build`: a bad
argument is one line naming it, and exit status 2, never a traceback."""

import argparse
import os


class Parser(argparse.ArgumentParser):
    """argparse, reporting an error as the one line "PROG: error: MESSAGE" (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def count(minimum):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is below {minimum}")
        return value

    return parse


def new_file(text):
    """An argparse type: a path a file can be written to (its folder exists)."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist")
    return text
