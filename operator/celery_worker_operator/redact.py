"""Keep secrets out of anything a person might read: logs, exceptions, status, Events, CLI output.

Broker URLs carry passwords (`redis://:pw@host`, `amqp://user:pw@host//`, `?password=pw`), and
library errors sometimes quote them back. `redact` scrubs every URL password in a free text and,
for secrets that travel outside a URL (a decoded password echoed by a driver), any literal given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

MASK = "***"

# scheme://user:PASSWORD@ — the password runs to the last `@` before whitespace or the next URL, so a
# password holding an unescaped `@` is masked whole rather than leaking its tail.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?P<secret>(?:(?!://)\S)*)@")
_QUERY = re.compile(r"(?P<head>[?&;]password=)(?P<secret>[^&#\s]*)", re.IGNORECASE)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every URL password, and every literal in `secrets` (raw or %-encoded), masked."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@" if m["secret"] else m[0], text)
    text = _QUERY.sub(lambda m: f"{m['head']}{MASK}" if m["secret"] else m[0], text)
    for secret in secrets:
        for form in {secret, quote(secret, safe=""), unquote(secret)}:
            if form:
                text = text.replace(form, MASK)
    return text


def url_secrets(url: str) -> list[str]:
    """The passwords a URL carries (userinfo and `password=` query), decoded, for `redact(..., secrets)`."""
    found = [unquote(m["secret"]) for m in _USERINFO.finditer(url)]
    found += [unquote(m["secret"]) for m in _QUERY.finditer(url)]
    return [secret for secret in found if secret]
