"""SOCKS5 benchmark harness: peers (Dante, microsocks, pproxy) versus our proxy."""
