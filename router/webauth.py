"""Authentication to a DICOMweb service: HTTP basic, a bearer token, OAuth2 client credentials.

The rules name where a secret is (an environment variable or a file on the routing host),
never the secret itself, so that it is in no rules block, task parameter, record, report or
log line. It is read when a request needs it; a message about it names where it was looked
for, never what was found.

OAuth2 (RFC 6749 4.4, client credentials): the access token is fetched from `token_url`
with the client's id and secret (HTTP basic, RFC 6749 2.3.1), kept for this run of files,
and fetched again before it expires (`REFRESH_MARGIN`) or when the service answers 401.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import httpx

from router.model import SendError, WebAuth

REFRESH_MARGIN = 60.0
"""Seconds before its expiry at which a token is fetched anew (or a tenth of its lifetime,
whichever is shorter), so that no request starts with a token about to lapse."""

_DEFAULT_LIFETIME = 300.0
"""A token whose answer gives no `expires_in` is used for this long at most."""


def read_secret(auth: WebAuth) -> str:
    """The secret, from the variable or file the rules name; SendError (permanent) if absent."""
    if auth.secret_env:
        value = os.environ.get(auth.secret_env)
        if not value:
            raise SendError(
                f"auth {auth.kind}: the environment variable {auth.secret_env} is not set "
                "(or empty) on this routing host",
                transient=False,
            )
        return value
    path = Path(auth.secret_file or "")
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SendError(f"auth {auth.kind}: cannot read {path}: {why}", transient=False) from None
    if not value:
        raise SendError(f"auth {auth.kind}: {path} is empty", transient=False)
    return value


class Credentials:
    """The Authorization header of one run of requests to one service."""

    def __init__(self, auth: WebAuth | None, client: httpx.Client) -> None:
        self.auth = auth
        self.client = client
        self._header: str | None = None
        self._expires = 0.0

    @property
    def describe(self) -> str:
        """What we authenticate with, for messages (never the secret)."""
        auth = self.auth
        if auth is None:
            return "no authentication (auth not set)"
        if auth.kind == "basic":
            return f"HTTP basic as {auth.username!r}, password from {auth.secret_source}"
        if auth.kind == "bearer":
            return f"a bearer token from {auth.secret_source}"
        return f"OAuth2 client {auth.client_id!r} at {auth.token_url}, secret from " + (
            auth.secret_source
        )

    def header(self) -> dict[str, str]:
        """The header to send now; a token near its expiry is fetched anew first."""
        auth = self.auth
        if auth is None:
            return {}
        if self._header is None or (auth.kind == "oauth2" and time.monotonic() >= self._expires):
            self._header = self._make()
        return {"Authorization": self._header}

    def renew(self) -> bool:
        """After a 401: whether new credentials may help (a fresh OAuth2 token)."""
        if self.auth is None or self.auth.kind != "oauth2":
            return False
        self._header = None
        return True

    def _make(self) -> str:
        auth = self.auth
        assert auth is not None
        secret = read_secret(auth)
        if auth.kind == "basic":
            pair = f"{auth.username}:{secret}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        if auth.kind == "bearer":
            return f"Bearer {secret}"
        return "Bearer " + self._fetch_token(auth, secret)

    def _fetch_token(self, auth: WebAuth, secret: str) -> str:
        where = f"OAuth2 token request to {auth.token_url}"
        data = {"grant_type": "client_credentials"}
        if auth.scope:
            data["scope"] = auth.scope
        try:
            response = self.client.post(
                auth.token_url or "",
                data=data,
                auth=httpx.BasicAuth(auth.client_id or "", secret),
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            reason = f"{where} failed: {type(exc).__name__}: {exc}"
            raise SendError(reason, transient=True) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            detail = ""
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                detail = f": {body['error']}"
                if isinstance(body.get("error_description"), str):
                    detail += f" ({body['error_description'][:200]})"
            transient = response.status_code >= 500 or response.status_code == 429
            raise SendError(
                f"{where} answered HTTP {response.status_code}{detail}", transient=transient
            )
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise SendError(f"{where}: the answer has no access_token", transient=False)
        lifetime = body.get("expires_in")
        seconds = float(lifetime) if isinstance(lifetime, int | float) else _DEFAULT_LIFETIME
        margin = min(REFRESH_MARGIN, seconds / 10)
        self._expires = time.monotonic() + max(0.0, seconds - margin)
        return token
