"""The two dependency lists (pyproject for pip, environment.yml for conda) must say the same thing."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", requirement.strip()).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


EXTRAS = ("dev", "ray", "export")  # the extras environment.yml installs too (as the Makefile does)


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    return dict(_normalise(r) for r in reqs)


def _environment() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    reqs = [ln.strip()[2:] for ln in lines[start + 1 :] if ln.strip().startswith("- ") and "-e ." not in ln]
    return dict(_normalise(r) for r in reqs)


def test_environment_yml_mirrors_pyproject():
    assert _environment() == _pyproject()


def test_ray_extra_is_declared_and_installed_by_make():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(_normalise(r)[0] == "ray" for r in extras["ray"])
    assert "ray" in _environment()
    assert ".[dev,ray,export]" in (ROOT / "Makefile").read_text()


def test_python_floor_matches():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = project["requires-python"].removeprefix(">=")
    assert f"python>={floor}" in (ROOT / "environment.yml").read_text()


def test_top_level_layout():
    for name in (
        "README.md",
        "environment.yml",
        "pyproject.toml",
        "Makefile",
        ".ci/run",
        "notebooks",
        "zsad",
        "reports",
        "tests",
    ):
        assert (ROOT / name).exists(), name
