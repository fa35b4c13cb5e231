"""The documentation site builds with every warning as an error, so it cannot rot.

``mkdocs build --strict`` (mkdocs-material + mkdocstrings + mkdocs-jupyter, ``mkdocs.yml``) fails on a broken
link, a missing page, an API object that no longer exists or a docstring griffe cannot parse. The notebooks are
rendered as saved (``tests/test_notebooks.py`` executes them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mkdocs(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_docs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    had_cache = (ROOT / ".cache").exists()
    res = _mkdocs(["build", "--strict", "--site-dir", str(site)], ROOT)
    assert res.returncode == 0, (
        "`mkdocs build --strict` failed (run `make docs` to see it); its warnings:\n"
        + "\n".join(line for line in res.stderr.splitlines() if "WARNING" in line or "Error" in line)[-4000:])
    # the API reference is generated from the docstrings
    api = (site / "api" / "io" / "index.html").read_text(encoding="utf-8")
    assert "dinov3geo.io.stac.write_item" in api and "dinov3geo.io.qgis.style_product" in api
    pipelines = (site / "api" / "pipelines" / "index.html").read_text(encoding="utf-8")
    assert "dinov3geo.pipelines.runner.run_pipeline" in pipelines
    # every notebook is a rendered page, and every guide page is there
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = site / "notebooks" / nb.stem / "index.html"
        assert page.is_file(), f"notebook {nb.name} not rendered"
    for md in sorted((ROOT / "docs" / "guide").glob("*.md")):
        assert (site / "guide" / md.stem / "index.html").is_file(), md.name
    # the README's images (docs/) are published too; nothing is written into the working tree
    assert (site / "demo_report.jpg").is_file()
    assert (ROOT / ".cache").exists() == had_cache


def test_strict_build_fails_on_a_stale_api_reference(tmp_path: Path) -> None:
    """The check itself: a page naming an API object that does not exist fails the strict build."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# API\n\n::: dinov3geo.io.stac.no_such_function\n")
    (tmp_path / "mkdocs.yml").write_text(
        "site_name: t\nstrict: true\nplugins:\n  - mkdocstrings:\n      handlers:\n        python:\n"
        f"          paths: [{ROOT}]\n")
    res = _mkdocs(["build", "--strict", "--site-dir", str(tmp_path / "site")], tmp_path)
    assert res.returncode != 0 and "no_such_function" in res.stderr + res.stdout
