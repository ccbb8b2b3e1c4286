"""`python -m collector` is `socks5-analytics collector`."""

from __future__ import annotations

import sys

from socks5_analytics.cli import main

sys.exit(main(["collector", *sys.argv[1:]]))
