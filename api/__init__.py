"""The stats API and the dashboard (Sanic): `create_app(settings)`, served by `serve`/`run`.

Routes read the storage repository only; parameters are parsed by the pure functions of
`params`, errors become the error object in the one handler of `errors`.
"""

from __future__ import annotations

from api.app import create_app

__all__ = ["create_app"]
