"""Where patient data may go: the destination allow-list of the routing host.

The routing rules can be edited by whoever reaches the Prefect UI; the allow-list cannot:
it is a file on each routing host (the `allowlist` setting, `DICOM_ROUTER_ALLOWLIST`),
never stored in Prefect. Every send checks it, so a rule that names any other destination
fails that entry, permanently, and sends nothing there.

The file, one destination a line, `#` starts a comment:

    10.0.0.20:104 MAINPACS      # DIMSE: host:port, and the called AE title if given
    pacs.example.org:11112      # any AE title at this host and port
    [fd00::20]:104              # IPv6 in brackets
    https://vna.example.org/dicomweb/   # DICOMweb: a URL prefix (whole path segments)

Host names are compared as written in the rules (case aside), not resolved: list the name
the rules use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from router.config import RoutingConfig
from router.model import AnyEndpoint, Endpoint, WebEndpoint

_DIMSE = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>[0-9]{1,5})(?:\s+(?P<aet>\S.*))?"
)


class AllowListError(ValueError):
    """The allow-list cannot be used; `problems` says why, line by line."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


@dataclass(frozen=True)
class AllowList:
    path: Path
    dimse: frozenset[tuple[str, int, str | None]]
    """(host in lower case, port, called AE title or None for any)."""
    urls: tuple[str, ...] = ()

    def refusal(self, endpoint: AnyEndpoint) -> str | None:
        """Why `endpoint` may not receive data, or None when it is listed."""
        if isinstance(endpoint, WebEndpoint):
            return self.url_refusal(endpoint.url)
        return self._dimse_refusal(endpoint)

    def _dimse_refusal(self, endpoint: Endpoint) -> str | None:
        host = endpoint.host.strip("[]").lower()
        for aet in (endpoint.called_aet, None):
            if (host, endpoint.port, aet) in self.dimse:
                return None
        return f"{endpoint.key} is not in the allow-list {self.path}"

    def url_refusal(self, url: str) -> str | None:
        """Why a DICOMweb service at `url` may not receive data, or None."""
        target = _normal_url(url)
        if any(target == p.rstrip("/") or target.startswith(p) for p in self.urls):
            return None
        return f"{url} is not in the allow-list {self.path}"


def _normal_url(url: str) -> str:
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path}"


def load_allowlist(path: Path | str) -> AllowList:
    """Read the allow-list; AllowListError names each bad line (fail closed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AllowListError(path, [f"cannot be read: {reason}"]) from None
    dimse: set[tuple[str, int, str | None]] = set()
    urls: list[str] = []
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "://" in line:
            parts = urlsplit(line)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(f"line {number}: {line!r} is not an http(s) URL")
                continue
            prefix = _normal_url(line)
            urls.append(prefix if prefix.endswith("/") else prefix + "/")
            continue
        match = _DIMSE.fullmatch(line)
        port = int(match["port"]) if match else 0
        if not match or not 1 <= port <= 65535:
            problems.append(
                f"line {number}: {line!r} is neither HOST:PORT [AETITLE] nor a URL prefix"
            )
            continue
        aet = match["aet"].strip() if match["aet"] else None
        if aet is not None and (len(aet) > 16 or " " in aet):
            problems.append(f"line {number}: {aet!r} is not an AE title")
            continue
        dimse.add((match["host"].strip("[]").lower(), port, aet))
    if problems:
        raise AllowListError(path, problems)
    return AllowList(path, frozenset(dimse), tuple(urls))


def refusal(allowlist: Path | None, endpoint: AnyEndpoint) -> str | None:
    """Why `endpoint` may not receive data under the `allowlist` setting (None: it may).

    Without the setting every destination may (as before the allow-list existed); with
    it, an unreadable or malformed file refuses every destination: fail closed.
    """
    if allowlist is None:
        return None
    try:
        return load_allowlist(allowlist).refusal(endpoint)
    except AllowListError as exc:
        return f"the allow-list {exc.path} cannot be used ({'; '.join(exc.problems)})"


def config_refusals(config: RoutingConfig, allowlist: Path | None, me: str, port: int) -> list[str]:
    """Every send entry of `config` that the allow-list refuses, named as validate does."""
    problems = []
    for spec in config.rules:
        for entry in spec.entries:
            endpoint = entry.destination.endpoint(me, port)
            why = refusal(allowlist, endpoint)
            if why:
                problems.append(
                    f"{spec.label}: send entry {entry.index} ({entry.pattern!r}): {why}"
                )
    return problems
