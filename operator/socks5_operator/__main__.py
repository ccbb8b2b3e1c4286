"""`python -m socks5_operator` is `socks5-analytics operator`."""

from __future__ import annotations

import sys

from socks5_analytics.cli import main

sys.exit(main(["operator", *sys.argv[1:]]))
