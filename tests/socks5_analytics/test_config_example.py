"""config.example.yaml must document every key of the schema, with its default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from socks5_analytics.config import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"
# Keys whose default depends on the machine, so the example shows them commented out.
MACHINE_DEFAULTS = {"node_id"}


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _schema_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _example_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in data.items():
        if isinstance(value, dict):
            keys |= _example_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_example_lists_every_key() -> None:
    documented = _example_keys(yaml.safe_load(EXAMPLE.read_text()))
    assert documented | MACHINE_DEFAULTS == _schema_keys(Settings)


def test_example_values_are_the_defaults(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    from_example = load_settings(EXAMPLE)
    defaults = load_settings(None)
    assert from_example == defaults
