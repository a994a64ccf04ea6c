"""Secret parts of notification URLs, kept out of every log line.

Notification URLs carry their service's credentials (a webhook token, an SMTP password, a bot
token in the host position). apprise knows which part of each URL is secret: its privacy form
of a URL masks them. Every part of the URL that the privacy form does not show as it is
(password, user, host, path segments, query values) is registered with `logging.register_secret`,
so the redaction that hides the NDIF API key hides these too; so is the whole URL.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

from ..logging import register_secret

#: Parts shorter than this are never taken for secrets (they would blank common words).
_MIN_SECRET = 6


def shown(url: str) -> str:
    """`url` as it may be logged: apprise's privacy form, or just its scheme when apprise cannot read it."""
    import apprise

    plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    if plugin:
        return str(plugin.url(privacy=True))
    return url.split("://", 1)[0] + "://***"


def register_url_secrets(url: str) -> list[str]:
    """Register the secret parts of `url` with the log redaction; returns them."""
    public = shown(url)
    parts = urlsplit(url)
    candidates = [parts.password, parts.username, parts.hostname, *parts.path.split("/")]
    candidates += [value for _key, value in parse_qsl(parts.query)]
    found = []
    for part in candidates:
        if not part:
            continue
        for value in {part, unquote(part)}:
            if len(value) >= _MIN_SECRET and value not in public:
                found.append(value)
    if parts.password:
        found.append(parts.password)  # a password is a secret however short
        found.append(unquote(parts.password))
    for value in [url, *found]:
        register_secret(value)
    return found
