"""The Kubernetes operator: ProxyUser and IPWhitelist resources → the proxies' policy Secret.

Import name `socks5_operator` (the folder is `operator/`, never importable as the standard
library's `operator`). Run it with `socks5-analytics operator`.
"""
