"""Which NVRTC longattn opens (CUDA 13's or CUDA 12's) and what it says when there is none.

No GPU needed: the resolution logic runs against a fake site-packages folder and a patched
``torch.version.cuda``; the native loader runs in subprocesses (the first NVRTC opened stays for
the process), against the NVRTC wheels installed here where there are any.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from longattn import _runtime


def touch(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site-packages folder holding both NVRTC wheels' files (and their builtins libraries),
    alone on sys.path, with no toolkit in view."""
    root = tmp_path / "site-packages"
    files = {
        13: touch(root / "nvidia/cu13/lib/libnvrtc.so.13"),
        12: touch(root / "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"),
    }
    touch(root / "nvidia/cu13/lib/libnvrtc-builtins.so.13.2")
    touch(root / "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.8")
    monkeypatch.setattr(sys, "path", [str(root)])
    monkeypatch.setattr(_runtime, "TOOLKIT_HOMES", ())
    for var in ("CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH", _runtime.NVRTC_ENV):
        monkeypatch.delenv(var, raising=False)
    return root, files


@pytest.mark.parametrize(
    ("torch_cuda", "env", "majors"),
    [
        ("12.6", None, (12,)),
        ("12.8", None, (12,)),
        ("12.9", None, (12,)),
        ("13.0", None, (13,)),
        ("13.2", None, (13,)),
        (None, None, (13, 12)),  # CPU build of torch: either
        ("11.8", None, (13, 12)),  # no NVRTC 11 support: either
        ("13.2", "12", (12,)),  # LONGATTN_NVRTC overrides torch's
        ("12.8", " 13 ", (13,)),
    ],
)
def test_majors_follow_torch_and_env(monkeypatch, torch_cuda, env, majors):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    if env is None:
        monkeypatch.delenv(_runtime.NVRTC_ENV, raising=False)
    else:
        monkeypatch.setenv(_runtime.NVRTC_ENV, env)
    assert _runtime.nvrtc_majors() == majors


@pytest.mark.parametrize("env", ["11", "14", "cu12", "12.8"])
def test_bad_env_is_rejected(monkeypatch, env):
    monkeypatch.setenv(_runtime.NVRTC_ENV, env)
    with pytest.raises(ValueError, match="expected 12 or 13"):
        _runtime.nvrtc_majors()


def test_cu12_torch_gets_the_cu12_wheel(site, monkeypatch):
    _, files = site
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    majors = _runtime.nvrtc_majors()
    assert _runtime.nvrtc_candidates(majors) == [files[12], "libnvrtc.so.12"]


def test_cu13_torch_gets_the_cu13_wheel(site, monkeypatch):
    _, files = site
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    majors = _runtime.nvrtc_majors()
    assert _runtime.nvrtc_candidates(majors) == [files[13], "libnvrtc.so.13"]


def test_cpu_torch_tries_13_then_12(site, monkeypatch):
    _, files = site
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _runtime.nvrtc_candidates(_runtime.nvrtc_majors()) == [
        files[13],
        "libnvrtc.so.13",
        files[12],
        "libnvrtc.so.12",
    ]


def test_cu13_wheel_in_the_cuda_nvrtc_folder(site, monkeypatch):
    root, files = site
    os.remove(files[13])
    other = touch(root / "nvidia/cuda_nvrtc/lib/libnvrtc.so.13")
    assert _runtime.nvrtc_candidates((13,)) == [other, "libnvrtc.so.13"]


def test_toolkits_after_the_wheel(site, monkeypatch, tmp_path):
    _, files = site
    home = tmp_path / "cuda-12.8"
    in_home = touch(home / "lib64/libnvrtc.so.12")
    touch(home / "lib64/libnvrtc.so.13.0")  # no soname file: not a CUDA 13 NVRTC here
    default = tmp_path / "default-cuda"
    in_default = touch(default / "lib64/libnvrtc.so.12")
    ld = tmp_path / "ld"
    in_ld = touch(ld / "libnvrtc.so.12")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setenv("LD_LIBRARY_PATH", os.pathsep.join(["", str(ld), str(tmp_path / "none")]))
    monkeypatch.setattr(_runtime, "TOOLKIT_HOMES", (str(default),))
    assert _runtime.nvrtc_candidates((12,)) == [
        files[12],
        in_home,
        in_default,
        in_ld,
        "libnvrtc.so.12",
    ]
    assert _runtime.nvrtc_candidates((13,)) == [files[13], "libnvrtc.so.13"]


def test_nothing_installed_leaves_the_soname(site, monkeypatch):
    root, files = site
    for f in files.values():
        os.remove(f)
    assert _runtime.nvrtc_candidates((12,)) == ["libnvrtc.so.12"]


@pytest.mark.parametrize(
    ("torch_cuda", "package"),
    [
        ("12.6", "pip install nvidia-cuda-nvrtc-cu12"),
        ("13.0", "pip install 'nvidia-cuda-nvrtc==13.*'"),
    ],
)
def test_install_hint_names_the_package(monkeypatch, torch_cuda, package):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.delenv(_runtime.NVRTC_ENV, raising=False)
    hint = _runtime.nvrtc_install_hint(_runtime.nvrtc_majors())
    assert package in hint
    assert f"CUDA {torch_cuda}" in hint
    other = "nvidia-cuda-nvrtc==13" if torch_cuda.startswith("12") else "nvidia-cuda-nvrtc-cu12"
    assert other not in hint


def test_preload_passes_torchs_major(site, monkeypatch):
    """_preload_nvrtc hands the cu12 candidates, major and hint to the native loader."""
    _, files = site
    calls = []

    class Native:
        def load_nvrtc(self, candidates, majors, hint):
            calls.append((candidates, majors, hint))
            raise RuntimeError("not found")  # a failure is left to the native side to report

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_runtime, "_native", Native())
    monkeypatch.setattr(_runtime, "_nvrtc_loaded", False)
    _runtime._preload_nvrtc()
    _runtime._preload_nvrtc()  # once per process
    assert len(calls) == 1
    candidates, majors, hint = calls[0]
    assert candidates == [files[12], "libnvrtc.so.12"]
    assert majors == [12]
    assert "nvidia-cuda-nvrtc-cu12" in hint


# -- the native loader, in fresh processes ---------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != _runtime.NVRTC_ENV}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def installed_wheel_file(major: int) -> str | None:
    for root in sys.path:
        for pattern in _runtime.NVRTC_WHEEL_FILES[major]:
            for path in sorted(glob.glob(os.path.join(root or ".", pattern))):
                if "builtins" not in os.path.basename(path):
                    return path
    return None


def test_native_error_names_candidates_and_package(tmp_path):
    missing = str(tmp_path / "missing" / "libnvrtc.so.12")
    r = run_python(
        f"""
        import torch
        from longattn import _runtime
        torch.version.cuda = "12.8"
        _runtime.nvrtc_candidates = lambda majors: [{missing!r}]
        try:
            _runtime.nvrtc_library()
        except RuntimeError as e:
            print("ERROR", e)
        """
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("ERROR the NVRTC library (libnvrtc.so.12) was not found"), out
    assert "pip install nvidia-cuda-nvrtc-cu12" in out
    assert missing in out


def test_native_rejects_a_bad_env():
    r = run_python(
        """
        from longattn import _runtime
        try:
            _runtime.nvrtc_library()
        except RuntimeError as e:
            print("ERROR", e)
        """,
        LONGATTN_NVRTC="11",
    )
    assert r.returncode == 0, r.stderr
    assert "ERROR LONGATTN_NVRTC" in r.stdout and "expected 12 or 13" in r.stdout


@pytest.mark.parametrize("major", [12, 13])
def test_native_opens_the_chosen_major(major):
    """With LONGATTN_NVRTC, the installed wheel of that major is opened, whatever torch's is."""
    path = installed_wheel_file(major)
    if path is None:
        pytest.skip(f"no NVRTC {major} wheel installed")
    r = run_python(
        """
        from longattn import _runtime
        name, major, minor = _runtime.nvrtc_library()
        print(name, major, minor)
        """,
        LONGATTN_NVRTC=str(major),
    )
    assert r.returncode == 0, r.stderr
    name, got, _ = r.stdout.split()
    assert (name, int(got)) == (path, major)


def test_native_checks_the_version():
    """A library of the wrong major version is refused (file names can lie)."""
    path = installed_wheel_file(13)
    if path is None:
        pytest.skip("no NVRTC 13 wheel installed")
    r = run_python(
        f"""
        from longattn import _native
        try:
            _native.load_nvrtc([{path!r}], [12], "HINT")
        except RuntimeError as e:
            print("ERROR", e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "wanted major [12]" in r.stdout and "HINT" in r.stdout, r.stdout


KERNEL = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }'


@pytest.mark.parametrize("major", [12, 13])
def test_native_compiles_with_the_chosen_major(major):
    """A kernel compiles to a CUBIN with each installed NVRTC, for sm_80 and sm_90a; a source
    that does not compile raises with NVRTC's log (CI compiles every kernel variant)."""
    if installed_wheel_file(major) is None:
        pytest.skip(f"no NVRTC {major} wheel installed")
    r = run_python(
        f"""
        from longattn import _native, _runtime
        print(_runtime.nvrtc_library()[1])
        for arch in ("sm_80", "sm_90a"):
            cubin, log = _native.nvrtc_compile("twice.cu", {KERNEL!r}, arch)
            print(arch, cubin[:4].hex(), len(cubin) > 512)
        try:
            _native.nvrtc_compile("broken.cu", "__global__ void f() {{ undeclared(); }}", "sm_80")
        except ValueError as e:
            print("ERROR", repr(str(e)))
        """,
        LONGATTN_NVRTC=str(major),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == [str(major), "sm_80 7f454c46 True", "sm_90a 7f454c46 True"]  # ELF
    assert (
        lines[3].startswith(f"ERROR 'NVRTC {major}.") and "failed to compile broken.cu" in lines[3]
    )
    assert "undeclared" in lines[3]  # the program log
