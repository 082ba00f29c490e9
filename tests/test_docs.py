"""The API reference (docs/api) builds from the docstrings without a single Sphinx warning, and covers the exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import torchlamb

pytest.importorskip("sphinx", reason="the docs extra (sphinx) is not installed")
from sphinx.cmd.build import build_main  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api"


# Sphinx 9's own napoleon still uses an interface Sphinx 9 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:The mapping interface for autodoc options:PendingDeprecationWarning")
def test_api_reference_builds_without_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The flags of `make docs`: -W makes any warning (broken RST in a docstring, a reference to a name that is not
    # documented) fail the build, -n checks every cross-reference. In this process, whose torch is already imported:
    # a fresh interpreter would double the test's time.
    out = tmp_path / "html"
    status = build_main(["-b", "html", "-W", "--keep-going", "-n", "-q",
                         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)])
    assert status == 0, f"sphinx failed:\n{capsys.readouterr().err}"

    index = (out / "index.html").read_text(encoding="utf-8")
    assert "Lamb" in index and "trust" in index
    optimizers = (out / "optimizers.html").read_text(encoding="utf-8")
    assert 'id="torchlamb.Lamb"' in optimizers and "trust ratio" in optimizers
    assert r"\lVert" in optimizers  # the docstrings' math reached the page (rendered by MathJax in the browser)

    # Every name `import torchlamb` exports has an entry, under torchlamb. or its defining module.
    pages = "".join(page.read_text(encoding="utf-8") for page in out.glob("*.html"))
    missing = [name for name in torchlamb.__all__
               if not re.search(rf'id="torchlamb\.(\w+\.)?{re.escape(name)}"', pages)]
    assert not missing, f"exported but not in the API reference: {missing}"
