"""Who may use the API: a bearer token or HTTP basic auth, from ``[api]``.

Credentials are required when ``[api] host`` is not a loopback address (or ``auth =
"required"``); the API refuses to start without any then. Configured credentials are
always checked. Comparisons are constant-time; passwords are configured as SHA-256 hashes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from triage_node.config import ApiConfig
from triage_node.errors import ConfigError

__all__ = ["Authenticator", "Principal", "is_loopback"]

#: Host names that mean "this machine only".
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the API on this machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``user`` is the basic-auth user name, or ``None`` for the shared token and when auth is
    off (the caller then names themself when giving feedback).
    """

    method: str  # "basic", "token" or "none"
    user: str | None = None


class Authenticator:
    """Checks ``Authorization`` headers against ``[api] token`` and ``[[api.users]]``.

    Parameters
    ----------
    api : ApiConfig
        The ``[api]`` section.

    Raises
    ------
    ConfigError
        If credentials are required (non-loopback host, or ``auth = "required"``) but none
        is configured.
    """

    def __init__(self, api: ApiConfig) -> None:
        self._token = api.token.encode()
        self._users = {u.name: u.password_sha256 for u in api.users}
        configured = bool(self._token or self._users)
        required = api.auth == "required" or not is_loopback(api.host)
        if required and not configured:
            why = ("[api] auth = \"required\"" if api.auth == "required"
                   else f"[api] host = {api.host!r} is reachable from other machines")
            raise ConfigError(
                f"{why} but no credentials are configured: set [api] token (or "
                "TRIAGE_NODE_API_TOKEN) or [[api.users]], or bind to 127.0.0.1")
        self.enabled = configured
        self.basic = bool(self._users)

    def check(self, authorization: str | None) -> Principal | None:
        """The caller for an ``Authorization`` header value, or None when refused."""
        if not self.enabled:
            return Principal("none")
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self._token:
            if hmac.compare_digest(value.encode(), self._token):
                return Principal("token")
            return None
        if scheme == "basic" and self._users:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            name, sep, password = decoded.partition(":")
            expected = self._users.get(name)
            digest = hashlib.sha256(password.encode()).hexdigest()
            # Compare even for unknown users, so timing does not tell which names exist.
            ok = hmac.compare_digest(digest, expected or "0" * 64)
            return Principal("basic", name) if sep and expected and ok else None
        return None
