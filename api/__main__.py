"""`python -m api` is `socks5-analytics api`."""

from __future__ import annotations

import sys

from socks5_analytics.cli import main

sys.exit(main(["api", *sys.argv[1:]]))
