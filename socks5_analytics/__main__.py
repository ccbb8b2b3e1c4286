"""`python -m socks5_analytics` is the `socks5-analytics` command."""

from __future__ import annotations

import sys

from socks5_analytics.cli import main

sys.exit(main())
