"""The package as a user gets it: ``python -m build`` makes an sdist, and a wheel from that sdist; the wheel,
installed into a fresh virtual environment outside the checkout, imports, compiles and runs the fused CPU kernels,
and finds its tokenizer.

The build runs on a copy of the checkout (``--no-isolation``, with this environment's setuptools: no network), so
the checkout gets no ``build/`` or egg-info from it. The fresh environment gets ``torch==2.13.0`` first (the local
CPU wheel, as in the Makefile), then the wheel with its declared dependencies, resolved against that torch.
The kernels are built in a directory of the test's own: torch's shared cache would not save the build, since the
other environment's include paths change the build commands, and ninja would then rebuild there too.
1.5 to 3 minutes on two cores (installing torch ~25 s, compiling the kernels 40 to 120 s depending on the load):
marked ``slow``, so ``pytest -m "not slow"`` leaves it out; ``make test`` runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

pytest.importorskip("build", reason="python -m build is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "torchlamb"
# The torch the Makefile installs: any other version would download the multi-GB CUDA build.
TORCH = "torch==2.13.0"
# Building writes these into the source tree, and none belongs in an sdist.
NOT_COPIED = {".git", ".venv", "build", "dist", "runs", "report", ".pytest_cache", ".hypothesis", ".ruff_cache"}

pytestmark = pytest.mark.slow


def _setuptools_is_recent() -> bool:
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:  # noqa: BLE001 - not installed, or an unreadable version
        return False


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _package_files() -> set[str]:
    """Every file of the source package, as wheel paths: all of it must ship (tests and docs live outside it)."""
    return {path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """An sdist and a wheel built from a copy of the checkout, the wheel from the sdist (``build``'s default)."""
    if not _setuptools_is_recent():
        pytest.skip("the build backend needs setuptools>=77 in this environment (pip install -e '.[dev]')")
    source = tmp_path_factory.mktemp("source")
    for entry in ROOT.iterdir():
        if entry.name in NOT_COPIED or entry.name.startswith("report-"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, source / entry.name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(entry, source / entry.name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)], timeout=600)
    (wheel,) = out.glob("torchlamb-*.whl")
    (sdist,) = out.glob("torchlamb-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_holds_the_package_its_data_and_entry_point(dist):
    import torchlamb

    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        info = f"torchlamb-{torchlamb.__version__}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    missing = _package_files() - names
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {sorted(missing)}"
    assert {"torchlamb/__init__.py", "torchlamb/data/kjv-wordpiece-8k.json"} <= names
    # The kernels: the CPU kernels' C++ sources (compiled on the user's machine) and the Triton kernels.
    csrc = {f"torchlamb/kernels/csrc/{name}.cpp" for name in ("driver", "quantizer", "lamb", "lars", "testing")}
    assert csrc | {"torchlamb/kernels/cpu.py", "torchlamb/kernels/triton_steps.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/")) or n.endswith(".pyc")]
    assert f"{info}/licenses/LICENSE" in names
    assert "torchlamb = torchlamb.cli:main" in entry_points
    assert f"Version: {torchlamb.__version__}" in metadata.splitlines()
    assert {"Requires-Dist: torch>=2.4", "Requires-Dist: ninja"} <= set(metadata.splitlines())


def test_sdist_holds_what_builds_the_wheel(dist):
    top = dist["sdist"].name.removesuffix(".tar.gz")
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    missing = {f"src/{name}" for name in _package_files()} - names
    assert not missing, f"not in the sdist: {sorted(missing)}"


# Run by the fresh environment's python, outside the checkout: argv[1] is that environment.
SCRIPT = textwrap.dedent("""
    import importlib.resources
    import json
    import os
    import sys
    import warnings
    from pathlib import Path

    import torch

    import torchlamb

    environment = Path(sys.argv[1]).resolve()
    assert Path(torchlamb.__file__).resolve().is_relative_to(environment), torchlamb.__file__

    # Kernels that cannot be built fall back to foreach with a warning: here that is a failure.
    warnings.filterwarnings("error", message="torchlamb")
    torch.manual_seed(0)
    weights = [torch.randn(257, 33), torch.randn(33), torch.randn(4096)]
    grads = [torch.randn_like(w) for w in weights]

    def two_steps(**implementation):
        params = [w.clone().requires_grad_() for w in weights]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer = torchlamb.Lamb(params, lr=1e-2, weight_decay=0.01, **implementation)
        for _ in range(2):
            optimizer.step()
        return [p.detach() for p in params]

    torch.testing.assert_close(two_steps(fused=True), two_steps(foreach=True))
    assert list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob("*.so")), "the fused kernels were not built"

    # Through the top package: importing torchlamb.data needs numpy (the demo extra), which is not installed here.
    resource = importlib.resources.files("torchlamb").joinpath("data", "kjv-wordpiece-8k.json")
    tokenizer = json.loads(resource.read_text(encoding="utf-8"))
    assert tokenizer["model"]["type"] == "WordPiece" and len(tokenizer["model"]["vocab"]) > 1000
    print("wheel ok", torchlamb.__version__, torch.__version__)
""")


def test_wheel_installs_and_runs_in_a_fresh_environment(dist, tmp_path):
    # pip comes from this environment (`pip --python`): the fresh one needs none, which saves ~12 s of ensurepip.
    # --no-compile skips byte-compiling torch's ~15k files, 3x faster; python compiles what it imports.
    environment = tmp_path / "venv"
    python = environment / "bin" / "python"
    try:
        _run([sys.executable, "-m", "venv", "--without-pip", str(environment)], timeout=300)
        pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-compile", "--quiet"]
        _run([*pip, TORCH], timeout=900)
        _run([*pip, str(dist["wheel"])], timeout=900)
        assert (environment / "bin" / "torchlamb").is_file(), "the console script was not installed"
        assert (environment / "bin" / "ninja").is_file(), "the ninja dependency was not installed"

        # As an activated environment, which puts the ninja it installed on PATH (torch looks for it there).
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
        env.update(PATH=f"{environment / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
                   TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
        work = tmp_path / "work"  # outside the checkout: its src/ must not be importable
        work.mkdir()
        assert not work.resolve().is_relative_to(ROOT)
        result = _run([str(python), "-c", SCRIPT, str(environment)], timeout=900, cwd=work, env=env)
        assert "wheel ok" in result.stdout
    finally:
        shutil.rmtree(environment, ignore_errors=True)  # 750 MB; pytest keeps its last three runs' tmp_path
