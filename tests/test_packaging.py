"""Packaging: pyproject and environment.yml declare the same dependencies; the README's two commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> set[str]:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[([^\]]+)\])?", req)
    assert m, req
    names = {m.group(1).lower().replace("_", "-")}
    if m.group(3):  # extras like dask[distributed] come as separate conda packages
        names |= {e.strip().lower() for e in m.group(3).split(",")}
    return names


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = set().union(*(_name(d) for d in py["project"]["dependencies"]))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda: set[str] = set()
    for d in env["dependencies"]:
        if isinstance(d, dict):
            conda |= set().union(*(_name(x) for x in d["pip"] if not x.startswith("-")))
        elif not d.startswith(("python", "pip")):
            conda |= _name(d)
    assert deps == conda, f"only in pyproject: {deps - conda}; only in environment.yml: {conda - deps}"


def test_torch_pins_agree():
    py = (ROOT / "pyproject.toml").read_text()
    env = (ROOT / "environment.yml").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1"):
        assert pin in py and pin in env


def test_readme_has_exactly_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_console_script_declared():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert py["project"]["scripts"]["dinov3geo"] == "dinov3geo.cli:main"
