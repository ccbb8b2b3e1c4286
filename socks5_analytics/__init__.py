"""What every component of socks5-proxy-analytics shares: configuration, logging, the CLI."""

from __future__ import annotations

__version__ = "0.1.0"
