"""API keys: stored as SHA-256 digests, found by digest, confirmed in constant time.

The rule file may hold a key as written (usually `${VAR}`), as `sha256:HEX`
(so the key itself never sits in a file), or name a key file with one key
per line. Only digests are kept in memory. A presented key is hashed once;
the first eight bytes of its digest pick the candidates and
`hmac.compare_digest` confirms the whole digest, so the check costs one
SHA-256 and a dictionary lookup however many keys exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

__all__ = [
    "MIN_KEY_LENGTH",
    "KeyIndex",
    "digest_of_entry",
    "keys_in_file",
    "query_value",
]

MIN_KEY_LENGTH = 16
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
_INDEX_BYTES = 8


def digest_of_entry(entry: str) -> bytes:
    """The digest for one rule-file entry: a key, or `sha256:HEX` of one.

    Raises ValueError naming what was expected; the key itself is never
    repeated in the message.
    """
    hashed = _HASHED.fullmatch(entry)
    if hashed is not None:
        return bytes.fromhex(hashed.group(1))
    if entry.startswith("sha256:"):
        raise ValueError("a 'sha256:' key must be followed by 64 hex digits")
    if len(entry) < MIN_KEY_LENGTH:
        raise ValueError(
            f"an API key must be at least {MIN_KEY_LENGTH} characters, "
            f"got one of {len(entry)}"
        )
    if not entry.isprintable() or entry != entry.strip():
        raise ValueError("an API key must be printable, without surrounding spaces")
    return hashlib.sha256(entry.encode("utf-8")).digest()


def keys_in_file(text: str) -> list[tuple[int, str]]:
    """(line number, entry) for each key in a key file; `#` starts a comment."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            found.append((number, entry))
    return found


class KeyIndex:
    """Maps key digests to consumer names."""

    __slots__ = ("_by_prefix",)

    def __init__(self, owners: Iterable[tuple[bytes, str]]) -> None:
        by_prefix: dict[bytes, list[tuple[bytes, str]]] = {}
        for digest, owner in owners:
            by_prefix.setdefault(digest[:_INDEX_BYTES], []).append((digest, owner))
        self._by_prefix = {prefix: tuple(found) for prefix, found in by_prefix.items()}

    def owner(self, presented: bytes) -> str | None:
        """The consumer whose key `presented` is, or None."""
        digest = hashlib.sha256(presented).digest()
        candidates = self._by_prefix.get(digest[:_INDEX_BYTES])
        if candidates is None:
            return None
        for stored, owner in candidates:
            if hmac.compare_digest(stored, digest):
                return owner
        return None


def query_value(query: bytes, name: bytes) -> bytes | None:
    """The first value of parameter `name` in a raw query string, decoded."""
    if not query:
        return None
    prefix = name + b"="
    for part in query.split(b"&"):
        if part.startswith(prefix):
            return unquote_to_bytes(part[len(prefix) :].replace(b"+", b" "))
    return None
