"""The wheel and the sdist carry the CUDA sources, and an installed, non-editable copy
finds them (and the emulator's C++ files) next to its Python files."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = sorted(p.name for p in (REPO / "csrc").glob("*.cu*"))
EMULATOR = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "rnnkernels" / "emulator").rglob("*") if p.suffix in (".h", ".cpp")
)

pytestmark = pytest.mark.slow


def _run(*args, cwd=REPO, **kwargs):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(out))
    (path,) = out.glob("rnnkernels-*.whl")
    return path


def test_wheel_contains_cuda_sources_and_emulator(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lstm_forward.cu" in CSRC, "no CUDA sources in the checkout"
    for name in CSRC:
        assert f"rnnkernels/csrc/{name}" in names, name
    for name in EMULATOR:
        assert name in names, name
    assert "rnnkernels/bench/causal_softmax.cu" in names


def test_installed_copy_finds_its_sources(wheel, tmp_path):
    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel))
    probe = (
        "import rnnkernels, rnnkernels._sources as s;"
        "print(rnnkernels.__file__); print(s.csrc_dir()); print(s.read_source('lstm_forward.cu')[:40])"
    )
    # Run from an empty folder with only the installed copy on the path, so the
    # checkout's own csrc/ cannot be what is found.
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    module_file, csrc_dir, head = _run(sys.executable, "-c", probe, cwd=tmp_path, env=env).splitlines()[:3]
    assert module_file.startswith(str(site)), module_file
    assert csrc_dir == str(site / "rnnkernels" / "csrc")
    assert head.startswith('#line 1 "csrc/lstm_forward.cu"')


def test_sdist_contains_cuda_sources(tmp_path):
    pytest.importorskip("build", reason="the `build` package is not installed (pip install rnnkernels[test])")
    _run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path))
    (sdist,) = tmp_path.glob("rnnkernels-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for name in CSRC:
        assert f"csrc/{name}" in names, name
    for name in EMULATOR:
        assert name in names, name
