"""The proxy nodes' reported policy versions, from the stats API's /nodes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

__all__ = ["ApiNodes"]


class ApiNodes:
    """`GET {api_url}/nodes`, every page, with the API token when there is one."""

    def __init__(self, api_url: str, token: str | None = None, *, page: int = 1000) -> None:
        self._url = api_url.rstrip("/") + "/nodes"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._page = page

    async def fetch(self) -> list[Mapping[str, Any]]:
        """Every node the API knows; OSError/ValueError when it cannot be read."""
        nodes: list[Mapping[str, Any]] = []
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as session:
                while True:
                    params = {"limit": str(self._page), "offset": str(len(nodes))}
                    async with session.get(self._url, params=params) as resp:
                        if resp.status != 200:
                            raise ValueError(f"GET {self._url}: HTTP {resp.status}")
                        page = await resp.json()
                    items = page.get("items") or []
                    nodes.extend(items)
                    if not items or len(nodes) >= int(page.get("total") or 0):
                        return nodes
        except aiohttp.ClientError as exc:
            raise OSError(f"GET {self._url}: {exc!r}") from exc
