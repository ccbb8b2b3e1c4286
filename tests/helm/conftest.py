"""The chart, loaded once by Helm's own library (helm-python-sdk: libhelm_c, no helm binary)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest

CHART = Path(__file__).resolve().parents[2] / "helm" / "socks5-analytics"  # as in test_chart


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded
