"""`python -m proxy_node` is `socks5-analytics proxy`."""

from __future__ import annotations

import sys

from socks5_analytics.cli import main

sys.exit(main(["proxy", *sys.argv[1:]]))
