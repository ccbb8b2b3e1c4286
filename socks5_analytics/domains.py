"""Destination names as the product stores them: canonical form and registrable part.

Pure functions shared by the collector (which stores what they say) and the proxy's
JSON-lines file (which has no collector to say it), so both write the same
`registered_domain` for the same name.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Protocol

import idna

__all__ = [
    "DomainAnswer",
    "SuffixList",
    "canonical_domain",
    "could_be_ip",
    "default_suffix_list",
    "domain_answer",
    "is_ip_text",
    "registered_domain",
]

_MAX_DOMAIN = 253
_MAX_LABEL = 63


class SuffixList(Protocol):
    """The one call of `publicsuffixlist.PublicSuffixList` we use."""

    def privatesuffix(self, domain: str) -> str | None:
        """The registrable domain of `domain`, None when it is a public suffix itself."""
        ...


def default_suffix_list(*, private_domains: bool = False) -> SuffixList:
    """The Public Suffix List shipped in the `publicsuffixlist` wheel (no network).

    ICANN section only by default, so `a.b.github.io` counts under `github.io`; with
    `private_domains` the private section is honoured too (`b.github.io`).
    """
    from publicsuffixlist import PublicSuffixList

    suffixes: SuffixList = PublicSuffixList(only_icann=not private_domains)
    return suffixes


def canonical_domain(text: str) -> str:
    """A domain lower-cased and IDNA-encoded, without a root dot; ValueError says why not."""
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise ValueError("empty")
    if name.isascii():
        if not name.isprintable() or " " in name:
            raise ValueError("contains spaces or control characters")
        name = name.lower()
    else:
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"not a valid internationalized name ({exc})") from exc
    if len(name) > _MAX_DOMAIN:
        raise ValueError(f"{len(name)} characters, at most {_MAX_DOMAIN}")
    for label in name.split("."):
        if not label:
            raise ValueError("has an empty label")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"a label of {len(label)} characters, at most {_MAX_LABEL}")
    return name


def could_be_ip(text: str) -> bool:
    """False when `ipaddress.ip_address` would surely refuse `text` (its refusal is slow).

    An IPv4 literal is ASCII digits and dots only; an IPv6 literal has colons.
    """
    return ":" in text or (text.isascii() and text.replace(".", "").isdigit())


def is_ip_text(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 literal."""
    if not could_be_ip(text):
        return False
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


DomainAnswer = tuple[str | None, str | None, str | None]  # (domain, registered, reason)


def domain_answer(suffixes: SuffixList, text: str) -> DomainAnswer:
    """(domain, registered_domain, reason) for a name the client sent (uncached): the
    canonical name and its registrable part, or the reason it is not a valid name; an IP
    literal in text is no name at all (None, None, None)."""
    try:
        name = canonical_domain(text)
    except ValueError as exc:
        return None, None, str(exc)
    if is_ip_text(name):
        return None, None, None
    return name, suffixes.privatesuffix(name), None


def registered_domain(suffixes: SuffixList, text: str) -> str | None:
    """The registrable part of a name the client sent, as stored; None for an IP literal,
    a name that is not valid, or a public suffix itself."""
    return domain_answer(suffixes, text)[1]
