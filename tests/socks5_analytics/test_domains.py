"""The registrable part of a destination name, as the collector and the file sink write it."""

from __future__ import annotations

import pytest

from socks5_analytics.domains import default_suffix_list, registered_domain

SUFFIXES = default_suffix_list()

REGISTERED: list[tuple[str, str | None]] = [
    ("www.bbc.co.uk", "bbc.co.uk"),
    ("WWW.Example.COM.", "example.com"),  # case and the root dot
    ("example.com", "example.com"),
    ("a.b.github.io", "github.io"),  # the ICANN section only
    ("bücher.example.de", "example.de"),
    ("bücher.de", "xn--bcher-kva.de"),  # IDNA
    ("co.uk", None),  # a public suffix itself
    ("localhost", None),
    ("192.0.2.1", None),  # IP literals are not names
    ("::1", None),
    ("bad name.example", None),  # not a valid name
    ("a..example.com", None),
    ("", None),
]


@pytest.mark.parametrize(("name", "expected"), REGISTERED,
                         ids=[name or "empty" for name, _ in REGISTERED])
def test_registered_domain(name: str, expected: str | None) -> None:
    assert registered_domain(SUFFIXES, name) == expected
