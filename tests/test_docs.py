"""The README is a front page and docs/ holds the rest (issue 35, item 6): every relative link resolves.

Checked for README.md and docs/*.md: each relative Markdown link points at a file or folder that exists and that git
does not ignore (results/ is mostly ignored, so a link there must name a committed file), and each `#anchor` into one
of these Markdown files names one of its headings. Links to http(s)/mailto and links that leave the repository (e.g.
../shared/) are not checked. The README stays short and keeps the commands CI runs.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMANDS = (".venv/bin/python -m pytest", ".venv/bin/python -m pytest -m slow")
OPENING_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/python -m edgerlhf.run --profile quick",
    "bash scripts/setup.sh && .venv/bin/python -m pytest",
)

_FENCE = re.compile(r"^ *(```|~~~).*?^ *\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return _CODE_SPAN.sub("code", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = _prose(text)
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def _ignored_by_git(path: Path, root: Path) -> bool:
    """True when git ignores ``path`` (it would be missing from a fresh clone); False without git."""
    if shutil.which("git") is None or not (root / ".git").exists():
        return False
    result = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "--", str(path.relative_to(root))],
                            capture_output=True)
    return result.returncode == 0


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """Every relative link in ``files`` that does not resolve, as 'file: target (why)'."""
    root = root.resolve()
    problems = []
    for md in files:
        for target in links(md.read_text(encoding="utf-8")):
            if not target or _SCHEME.match(target):
                continue  # http(s), mailto and other schemes are not checked
            path_part, _, anchor = target.partition("#")
            where = f"{md.relative_to(root)}: {target}"
            dest = (md.parent / path_part).resolve() if path_part else md.resolve()
            if not dest.is_relative_to(root):
                continue  # leaves the repository (e.g. ../shared/): not checked
            if not dest.exists():
                problems.append(f"{where} (no such file or folder)")
            elif _ignored_by_git(dest, root):
                problems.append(f"{where} (ignored by git: missing from a fresh clone)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no heading with this anchor)")
    return problems


def test_every_relative_link_in_the_readme_and_docs_resolves():
    files = markdown_files()
    assert len(files) > 1, "docs/*.md are missing"
    assert broken_links(files) == []


def test_the_link_check_finds_broken_links(tmp_path):
    """The checker itself: broken files, folders and anchors are reported; the rest is left alone."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "REPORT.md").write_text("# Report\n\n## Two words\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n[report](results/REPORT.md) [folder](results/) [anchor](results/REPORT.md#two-words)\n"
        "[site](https://example.org/x) [mail](mailto:a@b.c) [here](#title) [outside](../shared/PLAN.md)\n"
        "`[in code](missing-in-code.md)`\n```\n[in a block](missing-in-block.md)\n```\n"
        "[gone](results/missing.json) [bad anchor](docs/a.md#nowhere) [bad here](#nowhere)\n"
        "[ref]: docs/missing-ref.md\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n[back](../README.md#title) [up](../results/REPORT.md) [x](b.md)\n")
    assert broken_links(markdown_files(tmp_path), tmp_path) == [
        "README.md: results/missing.json (no such file or folder)",
        "README.md: docs/a.md#nowhere (no heading with this anchor)",
        "README.md: #nowhere (no heading with this anchor)",
        "README.md: docs/missing-ref.md (no such file or folder)",
        "docs/a.md: b.md (no such file or folder)",
    ]


@pytest.mark.parametrize("heading, expected", [
    ("Past one GPU: `accelerate launch`", "past-one-gpu-accelerate-launch"),
    ("Measured run time and the reference report", "measured-run-time-and-the-reference-report"),
    ("Reward models (stage 3)", "reward-models-stage-3"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_readme_is_a_front_page_that_keeps_the_ci_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for command in TEST_COMMANDS:
        assert command in text, command
    opening = re.match(r"# EdgeRLHF\n\n```bash\n(.*?)\n```\n", text, re.S)
    assert opening, "the README must open with the title and the bash block of its two commands"
    for command in OPENING_COMMANDS:
        assert command in opening.group(1).splitlines(), command


def test_each_docs_file_opens_with_a_title_and_what_it_holds():
    for md in markdown_files()[1:]:
        title, blank, sentence = md.read_text(encoding="utf-8").splitlines()[:3]
        assert title.startswith("# ") and not blank and sentence, md.name
