"""The wheel layout: every package folder is declared, and conf/ and the data ship inside it."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(setup["packages"])
    mapped = {folder: name for name, folder in setup["package-dir"].items()}
    found = set()
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in {"tests", ".venv", "build"} or any(p.startswith(".") for p in rel.parts):
            continue
        top = mapped.get(rel.parts[0])
        if top is None:
            continue
        found.add(".".join([top, *rel.parts[1:]]))
    assert found == declared


def test_config_tree_and_bundled_data_are_package_resources():
    assert (files("tensafe.conf") / "config.yaml").is_file()
    assert (files("tensafe.conf") / "model" / "smollm2_135m.yaml").is_file()
    assert (files("tensafe.data") / "sample_private.jsonl").is_file()
