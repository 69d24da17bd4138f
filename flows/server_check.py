"""Refuse a Prefect server that anyone on the network can drive without a password.

Whoever can call the API of the server the router uses can edit the rules, start runs on
any folder and read every report. A server reached at a loopback address is only open to
this host; one reached at any other address must answer 401 to a request without
credentials (Prefect's basic authentication, `PREFECT_SERVER_API_AUTH_STRING` on the
server and `PREFECT_API_AUTH_STRING` here). `dicom-router setup` and the worker check
this before they start, unless `DICOM_ROUTER_ALLOW_OPEN_SERVER` says the site means it.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx

from router.settings import Settings


class OpenServer(RuntimeError):
    """The Prefect server answers API calls without authentication from the network."""


def _loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_server_protected(api_url: str | None, settings: Settings) -> str | None:
    """Raise OpenServer for an open server at a non-loopback address; else a note or None.

    The probe is one GET of `/admin/version` without credentials: Prefect answers it 401
    when authentication is on (only `/health` and `/ready` stay open).
    """
    if not api_url:
        return None  # the embedded (ephemeral) API: this process only
    host = urlsplit(api_url).hostname or ""
    if _loopback(host):
        return None
    try:
        answer = httpx.get(f"{api_url.rstrip('/')}/admin/version", timeout=10)
    except httpx.HTTPError as exc:
        return f"could not check {api_url} for authentication: {exc}"
    if answer.status_code in (401, 403):
        return None
    if settings.allow_open_server:
        return (
            f"the Prefect server at {api_url} answers without authentication "
            "(DICOM_ROUTER_ALLOW_OPEN_SERVER is set: accepted)"
        )
    raise OpenServer(
        f"the Prefect server at {api_url} answers API calls without authentication "
        f"(HTTP {answer.status_code} to a request without credentials), from a non-loopback "
        "address: anyone who reaches it can change the routing rules and so where patient "
        "data goes. Turn on authentication (PREFECT_SERVER_API_AUTH_STRING on the server, "
        "PREFECT_API_AUTH_STRING here; README, Security), or set "
        "DICOM_ROUTER_ALLOW_OPEN_SERVER=true if this is intended."
    )


def check_credentials(api_url: str | None, auth_string: str | None) -> str | None:
    """Why the server refuses this process's credentials (401), or None when it takes them."""
    if not api_url:
        return None
    headers = {}
    if auth_string:
        token = base64.b64encode(auth_string.encode("utf-8")).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    try:
        answer = httpx.get(f"{api_url.rstrip('/')}/admin/version", headers=headers, timeout=10)
    except httpx.HTTPError:
        return None  # unreachable: the worker says so itself, and retries
    if answer.status_code != 401:
        return None
    if not auth_string:
        return (
            f"the Prefect server at {api_url} requires authentication: set "
            "PREFECT_API_AUTH_STRING (user:password, as PREFECT_SERVER_API_AUTH_STRING on the "
            "server)"
        )
    return f"the Prefect server at {api_url} refused PREFECT_API_AUTH_STRING (401): check it"
