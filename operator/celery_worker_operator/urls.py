"""Broker URLs put together from a URL without credentials and a user name and password kept apart,
and the TLS settings of a rediss:// broker.

The operator puts the credentials in percent-encoded, so any character works for its own
connections. A worker pod cannot encode: the kubelet pastes the Secret's value into the URL with
`$(VAR)` expansion, raw. kombu and redis-py split such a URL with `urllib` and decode it, so a raw
value survives as long as it holds none of the characters that end or re-read a URL part:
`UNSAFE` (and, in a user name, also `:` and `@`). Both sides refuse those characters, so the
workers and the operator always log in with the same credentials. Pure.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote, urlencode

# `/ ? #` end the host part, `%` starts an escape, `;` separates kombu's failover URLs, brackets
# read as an IPv6 host; whitespace and control characters are cut or refused by the parsers.
UNSAFE = frozenset("/?#%;[]")
UNSAFE_IN_USERNAME = UNSAFE | frozenset(":@")
USERNAME_ENV = "CELERY_BROKER_USERNAME"
PASSWORD_ENV = "CELERY_BROKER_PASSWORD"
# A query parameter kombu and redis-py read as a TLS setting (ssl_ca_certs, ssl_cert_reqs, ...).
SSL_PARAMETER = r"[?&]ssl_"
# Python's URL parser refuses a non-ASCII host part in which NFKC normalization makes one of these
# (a small colon, a fullwidth slash): such a character cannot stand raw in a URL either.
SEPARATORS = "/?#@:"


def fits_raw_in_url(value: str, *, username: bool = False) -> bool:
    """Whether `value` survives being pasted raw into a broker URL's user info."""
    refused = UNSAFE_IN_USERNAME if username else UNSAFE
    return not any(c in refused or not c.isprintable() or c.isspace() or _becomes_separator(c) for c in value)


def _becomes_separator(character: str) -> bool:
    return character not in SEPARATORS and any(s in unicodedata.normalize("NFKC", character) for s in SEPARATORS)


def with_credentials(url: str, username: str | None, password: str | None, *, encode: bool = True) -> str:
    """`url` (one URL, or kombu's `a;b` failover list) with `username` and/or `password` in each
    part's user info; None keeps the URL's own. `encode=False` inserts them as given (`$(VAR)`)."""
    return ";".join(_one_with_credentials(part, username, password, encode) for part in url.split(";"))


def _one_with_credentials(url: str, username: str | None, password: str | None, encode: bool) -> str:
    scheme, found, rest = url.partition("://")
    if not found:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, _, host = rest[:end].rpartition("@")
    old_user, _, old_password = userinfo.partition(":")
    user = old_user if username is None else (quote(username, safe="") if encode else username)
    secret = old_password if password is None else (quote(password, safe="") if encode else password)
    credentials = f"{user}:{secret}" if secret else user
    return f"{scheme}://{credentials + '@' if credentials else ''}{host}{rest[end:]}"


def tls_settings(ca: str | None, cert: str | None, key: str | None) -> dict[str, str]:
    """The TLS settings of a rediss:// broker with these files, as kombu and redis-py name them (the
    query of a broker URL, or Celery's `broker_use_ssl`): the server is always verified, against `ca`
    when given (else the system's CAs), and `cert` with `key` is presented as the client certificate."""
    files = {"ssl_ca_certs": ca, "ssl_certfile": cert, "ssl_keyfile": key}
    return {"ssl_cert_reqs": "required", **{name: path for name, path in files.items() if path is not None}}


def with_tls(url: str, settings: dict[str, str]) -> str:
    """`url` (each part of kombu's `a;b` failover list) with the TLS `settings` added to its query."""
    query = urlencode(settings, safe="/")
    return ";".join(f"{part}{'&' if '?' in part else '?'}{query}" for part in url.split(";"))
