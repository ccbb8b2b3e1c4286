"""The SOCKS5 proxy node: RFC 1928/1929 server that reports every connection it carries."""
