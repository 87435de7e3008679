"""The documentation against the project: links resolve, named code exists, the README is short.

Cheap: reads markdown, imports modules, loads no model.
"""

import importlib
import importlib.util
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "warp_kernel" / "README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
# uad.NAME, unsegment.NAME, unsegment.MODULE.NAME, warp_kernel.NAME (and .attr chains after them);
# not a file name such as uad.py, nor part of a longer name or path (test_uad.py, a/uad.x)
NAME = re.compile(r"(?<![\w./-])(uad|unsegment|warp_kernel)((?:\.[A-Za-z_]\w*)+)")
FILE_SUFFIXES = {"py", "md", "json", "csv", "txt", "sh"}


def prose(text: str) -> str:
    """The text without fenced code blocks (links in code are not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed except
    hyphens and underscores, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen, found = {}, set()
    for heading in HEADING.findall(prose(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path):
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield target


def test_the_pages_exist():
    assert (ROOT / "docs").is_dir()
    for path in PAGES:
        assert path.is_file(), path


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_page_and_every_page_links_back():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert not [p for p in PAGES[1:] if p.resolve() not in linked]
    for page in PAGES[1:]:
        back = {(page.parent / t.partition("#")[0]).resolve() for t in relative_links(page)}
        assert README.resolve() in back, page


def test_the_readme_is_under_200_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 200


def names_in(text: str) -> list:
    """The dotted code names a text mentions, file names such as uad.py left out."""
    names = []
    for root, rest in NAME.findall(text):
        parts = rest[1:].split(".")
        if len(parts) == 1 and parts[0] in FILE_SUFFIXES:  # uad.py is a file
            continue
        names.append(".".join([root, *parts]))
    return names


def mentioned_names() -> dict:
    """{dotted name: [pages]} of every uad., unsegment. and warp_kernel. name in the docs."""
    names = {}
    for page in PAGES:
        for name in names_in(page.read_text(encoding="utf-8")):
            names.setdefault(name, []).append(page.name)
    return names


def resolves(dotted: str) -> bool:
    """Whether a dotted name is a module, or an attribute chain on one. Old names of uad that
    are forwarded with a DeprecationWarning count as existing."""
    parts = dotted.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ImportError:
        return False
    path = parts[0]
    for part in parts[1:]:
        path = f"{path}.{part}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if hasattr(obj, part):
                obj = getattr(obj, part)
                continue
        # a submodule not imported by its package (warp_kernel.build, unsegment.cli)
        if hasattr(obj, "__path__") and importlib.util.find_spec(path) is not None:
            obj = importlib.import_module(path)
            continue
        return False
    return True


def test_every_named_function_module_and_constant_exists():
    names = mentioned_names()
    assert names  # the pattern finds something
    missing = [
        f"{name} (in {', '.join(sorted(set(pages)))})"
        for name, pages in sorted(names.items())
        if not resolves(name)
    ]
    assert not missing, "\n".join(missing)


def test_file_names_are_not_taken_for_code_names():
    text = "run `python uad.py IN OUT` (tests/test_uad.py), then uad.protect; unsegment.cli.main."
    assert names_in(text) == ["uad.protect", "unsegment.cli.main"]
    assert slug("Protection that survives publishing: `--robust`") == (
        "protection-that-survives-publishing---robust"
    )
    assert slug("The models eval.py scores") == "the-models-evalpy-scores"
