"""The operator's base policy (the chart's `policy.destinations` and `policy.limits`) is
checked as the proxies check a policy, before the operator starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from socks5_analytics.config import ConfigError
from socks5_operator.main import _base


@pytest.mark.parametrize(("text", "problem"), [
    ("limits:\n  max_connections: -3\n", "limits.max_connections: Input should be greater"),
    ("destinations:\n  rules:\n    - action: maybe\n", "destinations.rules.0.action"),
    ("destinations:\n  rules:\n    - {action: deny, cidrs: ['10.0.0.0/33']}\n",
     "destinations.rules.0.cidrs"),
    ("limits:\n  max_conections: 5\n", "limits.max_conections: unknown key"),
    ("users: []\n", "may hold only"),
])
def test_a_base_the_proxies_would_refuse_stops_the_operator(
        tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "base.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"operator\.base_policy_file") as caught:
        _base(path)
    assert problem in str(caught.value)


def test_a_good_base_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text("destinations:\n  block_private: false\nlimits:\n  max_connections: 500\n")
    assert _base(path) == {"destinations": {"block_private": False},
                           "limits": {"max_connections": 500}}
