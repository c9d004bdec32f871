"""Import boundaries between the packages (docs/ARCHITECTURE.md): what one import may pull in."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def imported_after(statement: str) -> set[str]:
    """The modules in sys.modules after `statement` runs in a fresh interpreter."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_evaluation_does_not_import_the_synthetic_screen_renderer() -> None:
    """evaluation reuses datamodules.atomic only; the renderer (and its scipy image filters) is the
    synthetic screen's business."""
    modules = imported_after("import evaluation")
    assert "datamodules.atomic" in modules  # the import under test really went through datamodules
    assert not {m for m in modules if m.startswith("datamodules.synthetic")}


def test_datamodules_still_exports_the_synthetic_screen_on_first_use() -> None:
    modules = imported_after("import datamodules\nassert callable(datamodules.write_screen)")
    assert "datamodules.synthetic.render" in modules
    assert "datamodules.synthetic.render" not in imported_after("import datamodules")
