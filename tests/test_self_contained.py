"""The repository and the wheel name no file outside the repository.

Every path that a tracked text file, the package sources (``python/longattn``) or a built wheel
names must be a file of this repository: no design notes kept elsewhere, no absolute paths of a
development machine, no markdown link that leaves the repository or leads nowhere.

The wheel is checked when ``LONGATTN_WHEEL`` names a built wheel (or a folder holding one)::

    maturin build --release -o dist
    LONGATTN_WHEEL=dist python -m pytest -q tests/test_self_contained.py

Its text members get every check; its binaries (the extension embeds the CUDA sources, comments
included) are searched for the same patterns in their strings.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import zipfile
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "longattn"

# The patterns are assembled from pieces so that this file does not match them itself.
_SPECS = "spec" + "s"
_SHARED = "shar" + "ed"
_NOTES = "ARCHITECTURE|BENCHMARKS|STACK"  # the design notes' names
MD = "." + "md"  # examples in this file end in MD, so they name no file
_PATH = r"(?:[\w.-]+/)*"  # leading path components of a token
_START = r"(?<![\w./<>*{}$~-])"  # a token starts here (not inside a word, path or template)

# (what it is, pattern, exempt when the matched path resolves to a file of the repository)
OUTSIDE = [
    (
        "design note outside the repository",
        re.compile(_START + "(" + _PATH + _SPECS + r"/[\w.-]+\.md)"),
        True,
    ),
    ("path above the repository", re.compile(r"(\.\./+" + _SHARED + r"\b)"), False),
    ("absolute path of a work tree", re.compile("(" + "/" + "work" + r"/)"), False),
    (
        "design note outside the repository",
        re.compile(r"(\b" + _SHARED + r"/(?:" + _NOTES + "|" + _SPECS + r")\b)"),
        False,
    ),
    (
        "design note outside the repository",
        re.compile(_START + "(" + _PATH + r"(?:" + _NOTES + r")\.md)"),
        True,
    ),
]
# Markdown files: every name ending in .md is a reference. Other files: only those with a slash
# (``args.md`` in Python is an attribute, ``docs/api/rat.md`` a path).
MD_TOKEN = re.compile(_START + r"((?:\.\./)*" + _PATH + r"[\w-][\w.-]*\.md)\b")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|#|//)")  # https:, mailto:, anchors


@cache
def repo_files() -> tuple[str, ...]:
    """Tracked files plus untracked ones git does not ignore (so a new file is checked too)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e})")
    names = sorted({n for n in out.decode().split("\0") if n})
    return tuple(n for n in names if (REPO / n).is_file())


@cache
def basenames() -> frozenset[str]:
    return frozenset(posixpath.basename(n) for n in repo_files())


def resolves(token: str, where: str) -> bool:
    """True when ``token`` names a file of the repository, read from the folder ``where`` (a
    repository-relative folder, "" for the root) or from the root; a bare name may be any file
    of that name (``rat.md`` in a list after ``docs/api/lightning.md``)."""
    token = token.split("#", 1)[0]
    if not token or token.startswith("/"):
        return False
    for base in dict.fromkeys((where, "")):
        cand = posixpath.normpath(posixpath.join(base, token))
        if cand == ".." or cand.startswith("../"):
            continue  # leaves the repository
        if (REPO / cand).exists():
            return True
    return "/" not in token and token in basenames()


def text_of(data: bytes) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def offences(name: str, text: str, where: str, markdown: bool) -> list[str]:
    """``name:line: what: match`` for every reference of ``text`` outside the repository."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        seen = set()

        def flag(what: str, match: str, lineno=lineno, seen=seen) -> None:
            if not any(match in s or s in match for s in seen):  # one entry per reference
                seen.add(match)
                found.append(f"{name}:{lineno}: {what}: {match}")

        for what, pattern, exempt in OUTSIDE:
            for m in pattern.finditer(line):
                if not (exempt and resolves(m.group(1), where)):
                    flag(what, m.group(1))
        for m in MD_TOKEN.finditer(line):
            token = m.group(1)
            if (markdown or "/" in token) and not resolves(token, where):
                flag("no such file in the repository", token)
        if markdown:
            for m in MD_LINK.finditer(line):
                target = m.group(1)
                if not EXTERNAL.match(target) and not resolves(target, where):
                    flag("markdown link to a missing file", target)
    return found


def check_files(names, read) -> list[str]:
    bad = []
    for name in names:
        text = text_of(read(name))
        if text is not None:
            where = posixpath.dirname(name)
            bad += offences(name, text, where, name.endswith(".md"))
    return bad


def report(bad: list[str]) -> str:
    return f"{len(bad)} reference(s) outside the repository:\n" + "\n".join(bad)


def test_patterns_catch_what_they_should():
    """The checks themselves: each kind of reference is flagged, in-repo ones are not."""
    notes = _SPECS + "/rat" + MD
    bad = [
        f'"""Tests ({notes}, "Tests")."""',
        "see ../" + _SHARED + "/" + "ARCHITECTURE" + MD,
        "cache in " + "/" + "work" + "/main/.venv",
        "# " + _SHARED + "/" + "BENCHMARKS" + MD,
        "Tolerances of " + "BENCHMARKS" + MD,
    ]
    for line in bad:
        assert offences("x.py", line, "tests", markdown=False), line
    doc = f"docs/x{MD}"
    assert offences(doc, f"[api](api/nowhere{MD})", "docs", markdown=True)
    assert offences(doc, f"[up](../../outside{MD})", "docs", markdown=True)
    assert offences(doc, f"rules of api{MD}", "docs", markdown=True)
    good = [
        'Math: docs/api/rat.md, "Backward".',
        f"[benchmarks](../benchmarks{MD}) and ![plot](../img/mqar-cpu.png)",
        "[home](https://github.com/longattn/longattn#readme), [top](#rat_attn)",
        "docs/api/<family>.md and benchmarks/bench_<family>.py",
    ]
    for line in good:
        assert not offences(f"docs/api/x{MD}", line, "docs/api", markdown=True), line
    assert not offences("x.py", "md = Path(args.md)  # docs/api/rat.md", "", markdown=False)


def test_repository_names_no_outside_path():
    bad = check_files(repo_files(), lambda n: (REPO / n).read_bytes())
    assert not bad, report(bad)


def test_package_sources_name_no_outside_path():
    """What goes into the wheel: every file under python/longattn (text files; the extension
    module is checked inside a built wheel, see test_wheel_names_no_outside_path)."""
    names = [
        p.relative_to(REPO).as_posix()
        for p in sorted(PACKAGE.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert any(n.endswith("longattn/__init__.py") for n in names)
    bad = check_files(names, lambda n: (REPO / n).read_bytes())
    assert not bad, report(bad)


def built_wheel() -> Path:
    given = os.environ.get("LONGATTN_WHEEL")
    if not given:
        pytest.skip("LONGATTN_WHEEL names no wheel (set it to a built wheel or its folder)")
    path = Path(given)
    if path.is_dir():
        wheels = sorted(path.glob("longattn-*.whl"), key=lambda p: p.stat().st_mtime)
        assert wheels, f"LONGATTN_WHEEL={given}: no longattn-*.whl in that folder"
        path = wheels[-1]
    assert path.is_file(), f"LONGATTN_WHEEL={given}: no such file"
    return path


def test_wheel_names_no_outside_path():
    wheel = built_wheel()
    bad = []
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        assert "longattn/__init__.py" in names, f"{wheel.name}: no longattn/__init__.py"
        native = [n for n in names if re.match(r"longattn/_native\..*(so|pyd)$", n)]
        assert native, f"{wheel.name}: no extension module longattn/_native"
        for name in names:
            data = zf.read(name)
            text = text_of(data)
            # Paths are read from the repository root: the package's docstrings and the README
            # in METADATA cite docs/..., which the repository holds.
            if text is None:  # a binary: search its strings ("line" counts its newlines)
                text = data.decode("utf-8", errors="replace")
            bad += offences(f"{wheel.name}!{name}", text, "", name.endswith(".md"))
    assert not bad, report(bad)
