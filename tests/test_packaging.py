"""The installed wheel, not the checkout: files a user's install needs at run time must be inside it.

The rest of the suite imports gpuheart from the checkout (or an install made from it), where a path that
only exists in the source tree still resolves; an installed wheel once found no CUDA kernel that way.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETWORK_TROUBLE = ("No matching distribution", "Could not find a version", "NewConnectionError",
                   "Temporary failure in name resolution", "Network is unreachable")


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    for name in ("gpuheart", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, timeout=600)
    if out.returncode and any(s in out.stdout + out.stderr for s in NETWORK_TROUBLE):
        pytest.skip("pip could not fetch the build backend (setuptools) to build the wheel: no package index")
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("gpuheart-*.whl")
    return wheel


def test_installed_wheel_finds_its_kernels_and_weights(tmp_path):
    wheel = _build_wheel(tmp_path)
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import gpuheart
        from gpuheart import backend, unet
        assert gpuheart.__file__.startswith({str(target)!r}), gpuheart.__file__
        assert str(backend.kernel_dir()).startswith({str(target)!r}), backend.kernel_dir()
        for name in {kernels!r}:
            assert "__global__" in backend.kernel_source(name), name
        assert unet.default_weights_path().is_file()
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
