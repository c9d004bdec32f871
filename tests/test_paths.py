"""Every repository path that README.md, docs/*.md and the CLI's --help name exists.

A reader follows these paths to find code, configs and results; a renamed file leaves them pointing
nowhere without any other test noticing. What counts as a repository path:

* a token `first/...` whose first component is a top-level directory of the repository
  (configs/, docs/, tests/, ...), checked from the repository root; `<placeholder>`, `{field}`
  and `*` parts become globs that must match at least one file;
* a markdown link target that is not a URL, resolved from the linking file's directory.

Not checked, by design: paths under directories that do not exist in a checkout (`runs/`,
`OUT/`, `out/`, `DIR/`, `/data/...`: what commands write or users supply), `../shared/...`
(the real data, found through $PHENOSCALE_SHARED; the data-bound tests check it), and the
files in OUTPUTS, which a command named beside them writes.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from phenoscale.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
#: top-level directories a path must start with to be checked (hidden ones and outputs left out)
TOP_DIRS = sorted(
    p.name
    for p in REPO.iterdir()
    if p.is_dir()
    and not p.name.startswith((".", "_"))
    and p.name not in {"runs", "build", "dist"}
    and not p.name.endswith(".egg-info")
)
#: repository paths that documentation names as outputs of a command, not as files in a checkout
OUTPUTS = {"benchmarks/results/gpu.json": "written by `python -m benchmarks.gpu_check` on a CUDA machine"}
TOKEN = re.compile(r"(?<![\w./:$~-])((?:" + "|".join(map(re.escape, TOP_DIRS)) + r")/[\w./<>*{}-]*)")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
PLACEHOLDER = re.compile(r"<[^>]*>|\{[^}]*\}")


def command_helps(parser: argparse.ArgumentParser, name: str = "phenoscale") -> Iterator[tuple[str, str]]:
    """(command line, --help text) of the parser and every sub-command below it."""
    yield name, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from command_helps(child, f"{name} {sub}")


def documents() -> list[tuple[str, Path, str]]:
    """(source label, directory relative links start from, text) of every checked document."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    docs = [(str(p.relative_to(REPO)), p.parent, p.read_text()) for p in pages]
    return docs + [(f"`{cmd} --help`", REPO, text) for cmd, text in command_helps(build_parser())]


def exists(path: Path) -> bool:
    """The path exists; with placeholders or wildcards, at least one file matches them."""
    text = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    pattern = PLACEHOLDER.sub("*", text)
    if "*" not in pattern:
        return path.exists()
    return any(REPO.glob(pattern)) if path.is_relative_to(REPO) else True


def named_paths(base: Path, text: str) -> set[Path]:
    """Repository paths named in `text` (rules in the module docstring)."""
    found = {REPO / m.group(1).rstrip(".") for m in TOKEN.finditer(text)}
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            found.add((base / target).resolve())
    return {p for p in found if not (p.is_relative_to(REPO) and str(p.relative_to(REPO)) in OUTPUTS)}


def test_the_rules_find_paths_and_catch_a_missing_one() -> None:
    """The extraction itself: backticks, prose, links, placeholders; a wrong name is reported."""
    text = (
        "see `configs/paper/mae_vit_s16.yaml`, tests/conftest.py and [models](models.md); "
        "configs/experiments/demo_<model>.yaml; runs/demo/ is output; "
        "configs/paper/camae_vits16.yaml"
    )
    found = named_paths(REPO / "docs", text)
    assert {str(p.relative_to(REPO)) for p in found} == {
        "configs/paper/mae_vit_s16.yaml",
        "tests/conftest.py",
        "docs/models.md",
        "configs/experiments/demo_<model>.yaml",
        "configs/paper/camae_vits16.yaml",
    }
    assert [p.name for p in found if not exists(p)] == ["camae_vits16.yaml"]


@pytest.mark.parametrize("source, base, text", [pytest.param(*doc, id=doc[0]) for doc in documents()])
def test_named_repository_paths_exist(source: str, base: Path, text: str) -> None:
    missing = sorted(
        str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in named_paths(base, text) if not exists(p)
    )
    assert not missing, f"{source} names paths that do not exist: {missing}"


def test_no_text_points_to_the_external_design_notes() -> None:
    """Code, docs, tests and configs explain themselves; they never send a reader to a notes file
    that is not part of the repository."""
    name = "DESIGN" + ".md"
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}
    hits = [
        str(p.relative_to(REPO))
        for top in [*TOP_DIRS, "."]
        for p in ((REPO / top).rglob("*") if top != "." else REPO.glob("*"))
        if p.is_file() and (p.suffix in suffixes or p.name == "Makefile") and name in p.read_text(errors="ignore")
    ]
    assert not hits, f"{name} is referenced from {sorted(set(hits))}"
