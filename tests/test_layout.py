"""The test tree's layout rules that pytest only reports when every folder is collected."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_module_basenames_are_unique() -> None:
    """Without __init__.py files, pytest imports test and helper modules by basename."""
    names = Counter(p.name for p in TESTS.rglob("*.py")
                    if p.name != "conftest.py" and "__pycache__" not in p.parts)
    assert [name for name, count in names.items() if count > 1] == []


def test_no_package_shadows_a_real_one() -> None:
    """An __init__.py would make e.g. tests/proxy_node import as `proxy_node`."""
    assert list(TESTS.rglob("__init__.py")) == []
