"""Packaging: one version source, the metadata of pyproject.toml, and no numpy.

With ``LONGATTN_WHEEL`` (a built wheel or its folder, as for tests/test_self_contained.py) the
wheel's METADATA is checked too.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import longattn
from test_self_contained import built_wheel

REPO = Path(__file__).resolve().parents[1]
CARGO = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = {"demo", "transformers", "bench", "test"}


def test_version_has_one_source():
    """Cargo.toml holds the version; pyproject.toml takes it from there (dynamic) and
    ``longattn.__version__`` from the installed metadata."""
    assert "version" not in PYPROJECT, "pyproject.toml: the version belongs to Cargo.toml"
    assert "version" in PYPROJECT.get("dynamic", []), "pyproject.toml: dynamic = ['version']"
    installed = importlib.metadata.version("longattn")
    assert installed == CARGO["version"], (
        f"installed longattn {installed} != Cargo.toml {CARGO['version']}: reinstall the package"
    )
    assert longattn.__version__ == installed
    literals = [
        f"{p.relative_to(REPO)}:{node.lineno}"
        for p in sorted((REPO / "python" / "longattn").rglob("*.py"))
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and node.value.value != "0+unknown"
    ]
    assert not literals, f"a version literal besides Cargo.toml's: {literals}"


def test_pyproject_metadata():
    assert PYPROJECT["license"] == CARGO["license"] == "Apache-2.0"  # an SPDX expression
    classifiers = PYPROJECT["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")], (
        "PEP 639: no License classifier beside a license expression"
    )
    for c in (
        "Environment :: GPU :: NVIDIA CUDA",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: Rust",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ):
        assert c in classifiers, c
    assert set(PYPROJECT["urls"]) >= {"Homepage", "Repository", "Documentation", "Issues"}
    assert EXTRAS <= set(PYPROJECT["optional-dependencies"])
    assert not [d for d in PYPROJECT["dependencies"] if d.startswith("numpy")]


def test_package_does_not_import_numpy():
    """No module of the package imports numpy, and the ops run where numpy cannot be imported
    (tensors reach Rust through DLPack)."""
    imports = []
    for p in sorted((REPO / "python" / "longattn").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(n.split(".")[0] == "numpy" for n in names):
                imports.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert not imports, f"numpy imported at {imports}"
    code = (
        "import sys\n"
        "sys.modules['numpy'] = None  # import numpy now raises ImportError\n"
        "import torch, longattn\n"
        "q, k, v = (torch.randn(1, 9, 2, 4, requires_grad=True) for _ in range(3))\n"
        "o, _ = longattn.lightning_attn(q, k, v, longattn.lightning_slopes(2))\n"
        "y = longattn.rat_attn(q, k, v, torch.rand(1, 9, 2, 4), chunk_size=4)\n"
        "(o.sum() + y.sum()).backward()\n"
        "assert sys.modules['numpy'] is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_wheel_metadata():
    wheel = built_wheel()
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = HeaderParser().parsestr(zf.read(name).decode())
    assert meta["Name"] == "longattn"
    assert meta["Version"] == CARGO["version"]
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    with zipfile.ZipFile(wheel) as zf:
        (license_member,) = [n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert "Apache License" in zf.read(license_member).decode()
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("torch") for r in requires)
    assert not [r for r in requires if r.startswith("numpy")], requires
    assert EXTRAS <= set(meta.get_all("Provides-Extra") or [])
    urls = {u.split(",")[0].strip().lower() for u in meta.get_all("Project-URL") or []}
    assert {"homepage", "repository", "documentation", "issues"} <= urls, urls
