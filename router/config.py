"""The routing configuration: `{"routing": [RULE, ...]}` (SPEC section 2).

Validation is strict because a routing file is written by hand and a typo must not turn
into "send everything everywhere": unknown keys, bad regexes, ports and AE titles are
refused, and every problem names the rule (position and name) and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from router import jsonc
from router.model import AnyEndpoint, Endpoint, TlsOptions, WebAuth, WebEndpoint

ME = "$me"
PORT = "$port"

_TRUE = {"1", "t", "true", "y", "yes"}
_FALSE = {"0", "f", "false", "n", "no"}


class ConfigError(ValueError):
    """The configuration cannot be used; `problems` lists every reason found."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


def parse_flag(value: Any) -> bool:
    """0/1, "0"/"1", true/false, "T"/"F" (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected 0/1, true/false or T/F, got {value!r}")


def check_regex(value: Any) -> str:
    """A pattern RE2 can match (in linear time; `router.rules`), or why not."""
    from router.rules import compile_pattern

    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression as a string, got {value!r}")
    shown = value if len(value) <= 60 else value[:57] + "..."
    try:  # Python's syntax too: RE2 reads some malformed repetitions as plain text
        re.compile(value)
    except (re.error, OverflowError) as exc:
        raise ValueError(f"invalid regular expression {shown!r}: {exc}") from None
    except RecursionError:
        raise ValueError(f"regular expression nested too deeply: {value[:40]!r}...") from None
    try:
        compile_pattern(value)
    except ValueError as exc:
        raise ValueError(
            f"invalid regular expression {shown!r}: {exc} (patterns are matched in linear "
            "time, without backreferences or lookaround)"
        ) from None
    return value


def check_aet(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an AE title as a string, got {value!r}")
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16:
        raise ValueError(f"AE title {value!r} must have 1 to 16 characters")
    if "\\" in stripped or any(ord(c) < 32 or ord(c) == 127 for c in stripped):
        raise ValueError(f"AE title {value!r} must not contain a backslash or control characters")
    if not stripped.isascii():
        raise ValueError(f"AE title {value!r} must be ASCII (DICOM's default repertoire)")
    return stripped


def check_port(value: Any) -> int | str:
    if value == PORT:
        return PORT
    if isinstance(value, bool):
        raise ValueError(f"expected a port number, got {value!r}")
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f'expected a port number 1-65535 or "$port", got {value!r}')
    return value


def check_host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected a host name, an address or "$me", got {value!r}')
    if any(c.isspace() for c in value.strip()):
        raise ValueError(f"host {value!r} contains white space")
    return value.strip()


def parse_tag(value: Any) -> str:
    """`"0008,103e"`, `"(0008,103E)"`, `"0008103e"` or a keyword → `"0008103E"`."""
    if not isinstance(value, str):
        raise ValueError(f"expected a DICOM tag, got {value!r}")
    text = value.strip()
    compact = re.sub(r"[\s(),]", "", text)
    if re.fullmatch(r"[0-9A-Fa-f]{8}", compact) and (text.startswith("(") == text.endswith(")")):
        return compact.upper()
    from pydicom.datadict import tag_for_keyword  # here: importing pydicom costs ~0.5 s

    tag = tag_for_keyword(text) if text.isidentifier() else None
    if tag is not None:
        return f"{tag:08X}"
    raise ValueError(
        f'unknown DICOM tag {value!r}: use "gggg,eeee" (e.g. "0008,103e") '
        "or a keyword (e.g. SeriesDescription)"
    )


def tag_label(tag: str) -> str:
    """`0008103E` → `(0008,103E) SeriesDescription` for messages."""
    from pydicom.datadict import keyword_for_tag

    keyword = keyword_for_tag(int(tag, 16))
    return f"({tag[:4]},{tag[4:]})" + (f" {keyword}" if keyword else "")


def check_url(value: Any) -> str:
    """A DICOMweb service root: http(s), a host, no credentials, query or `/studies`."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected the DICOMweb service root as an http(s) URL, got {value!r}")
    text = value.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"URL {text!r} cannot be read: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"URL {text!r} must be http:// or https:// with a host")
    if any(c.isspace() for c in text):
        raise ValueError(f"URL {text!r} contains white space")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "URL holds credentials: they would be shown wherever the destination is; "
            "use auth (a secret from an environment variable or a file) instead"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"URL {text!r} must have no query (?) or fragment (#)")
    root = text.rstrip("/")
    if root.lower().endswith("/studies"):
        raise ValueError(
            f"URL {text!r} ends in /studies: give the service root, STOW-RS posts to URL/studies"
        )
    return root


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_SECRETS = {"basic": "password", "bearer": "token", "oauth2": "client_secret"}
"""Per kind of auth, the secret it needs, named `<secret>_env` or `<secret>_file`."""


class Auth(BaseModel):
    """Extension `auth` of a DICOMweb destination; secrets only by reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["none", "basic", "bearer", "oauth2"]
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    token_env: str | None = None
    token_file: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    scope: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_secret_here(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in ("password", "token", "client_secret", "secret", "access_token"):
                if key in value:
                    raise ValueError(
                        f"{key}: a secret is never written in the rules (they are shown in the "
                        f"UI and stored in Prefect): name an environment variable ({key}_env) "
                        f"or a file ({key}_file) on the routing host"
                        if key in _SECRETS.values()
                        else f"{key}: a secret is never written in the rules: name an "
                        "environment variable or a file (see README, DICOMweb destinations)"
                    )
        return value

    @model_validator(mode="after")
    def _what_its_type_needs(self) -> Auth:
        problems = []
        needed = {
            "none": set(),
            "basic": {"username"},
            "bearer": set(),
            "oauth2": {"token_url", "client_id"},
        }[self.type]
        secret = _SECRETS.get(self.type)
        allowed = set(needed) | {"type"} | ({"scope"} if self.type == "oauth2" else set())
        if secret:
            allowed |= {f"{secret}_env", f"{secret}_file"}
        given = {k for k, v in self.__dict__.items() if v is not None}
        for key in sorted(given - allowed):
            problems.append(f"{key} is not used by auth type {self.type!r}")
        for key in sorted(needed - given):
            problems.append(f"auth type {self.type!r} needs {key}")
        if secret:
            sources = [k for k in (f"{secret}_env", f"{secret}_file") if k in given]
            if len(sources) != 1:
                problems.append(
                    f"auth type {self.type!r} needs its {secret.replace('_', ' ')} from exactly "
                    f"one of {secret}_env (an environment variable) or {secret}_file (a file)"
                )
            env = getattr(self, f"{secret}_env")
            if env is not None and not _ENV_NAME.fullmatch(env):
                problems.append(f"{secret}_env {env!r} is not an environment variable name")
        if self.token_url is not None:
            try:
                check_url(self.token_url)
            except ValueError as exc:
                problems.append(f"token_url: {str(exc).replace('URL', 'token_url', 1)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model(self) -> WebAuth | None:
        if self.type == "none":
            return None
        secret = _SECRETS[self.type]
        return WebAuth(
            kind=self.type,
            secret_env=getattr(self, f"{secret}_env"),
            secret_file=getattr(self, f"{secret}_file"),
            username=self.username,
            token_url=self.token_url,
            client_id=self.client_id,
            scope=self.scope,
        )


Flag = Annotated[bool, BeforeValidator(parse_flag)]
Regex = Annotated[str, BeforeValidator(check_regex)]
AETitle = Annotated[str, BeforeValidator(check_aet)]
Port = Annotated[int | str, BeforeValidator(check_port)]
Host = Annotated[str, BeforeValidator(check_host)]
Tag = Annotated[str, BeforeValidator(parse_tag)]
Url = Annotated[str, BeforeValidator(check_url)]


class Tls(BaseModel):
    """Extension `tls` of a destination."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: Flag = True

    @field_validator("key")
    @classmethod
    def _key_needs_cert(cls, value: str | None, info: Any) -> str | None:
        if value is not None and info.data.get("cert") is None:
            raise ValueError("a key without a cert: give both, or neither")
        return value


_DIMSE_KEYS = ("IP", "PORT", "AETitleTo", "associations", "max_associations", "convert")
"""Keys of a DIMSE destination only (AETitleSender is accepted by both, and unused by
DICOMweb, so that a destination changes kind by replacing IP, PORT and AETitleTo)."""
_WEB_KEYS = (
    "URL",
    "auth",
    "requests",
    "max_requests",
    "instances_per_request",
    "bytes_per_request",
)
"""Keys of a DICOMweb destination only."""


class Destination(BaseModel):
    """Where one send entry goes, and which files it takes: a DIMSE node (IP, PORT,
    AETitleTo) or a DICOMweb service (URL)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    IP: Host | None = None
    PORT: Port | None = None
    AETitleSender: AETitle | None = None
    AETitleTo: AETitle | None = None
    URL: Url | None = None
    """DICOMweb: the service root; STOW-RS posts to URL/studies."""
    break_: Flag = Field(False, alias="break")
    which: list[dict[Tag, Regex]] | None = None
    max_associations: int | None = Field(
        None, ge=1, le=64, validation_alias=AliasChoices("max_associations", "max_requests")
    )
    """Extension: associations (DICOMweb: `max_requests`, requests) open at once to this
    destination over all jobs: the size of its concurrency limit."""
    associations: int | None = Field(
        None, ge=1, le=16, validation_alias=AliasChoices("associations", "requests")
    )
    """Extension: associations (DICOMweb: `requests`) one job's files are spread over."""
    tls: Tls | None = None
    """Extension: DICOM TLS, or for DICOMweb, https's CA bundle and client certificate."""
    convert: Flag = True
    """Extension: decompress losslessly what the destination does not take as it is."""
    auth: Auth | None = None
    """Extension, DICOMweb: how to authenticate."""
    instances_per_request: int | None = Field(None, ge=1, le=10000)
    """Extension, DICOMweb: instances per STOW-RS request (default: the setting)."""
    bytes_per_request: int | None = Field(None, ge=1 << 16)
    """Extension, DICOMweb: bytes of files per STOW-RS request (default: the setting)."""

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        """A DIMSE destination or a DICOMweb one, with what its kind needs, never both:
        each problem named by its key."""
        if not isinstance(value, dict):
            return value
        problems: list[tuple[str, str]] = []
        if "URL" in value:
            for key in _DIMSE_KEYS:
                if key in value:
                    instead = {"associations": "requests", "max_associations": "max_requests"}
                    hint = f" (its key is {instead[key]})" if key in instead else ""
                    problems.append(
                        (
                            key,
                            f"not a key of a DICOMweb destination (URL){hint}: one destination "
                            "is one kind; use two send entries to send both ways",
                        )
                    )
        else:
            dimse = any(k in value for k in ("IP", "PORT", "AETitleTo"))
            for key in _WEB_KEYS[1:]:
                if key in value:
                    why = (
                        "and this one is DIMSE (IP, PORT, AETitleTo)"
                        if dimse
                        else "and this one has no URL (the DICOMweb service root)"
                    )
                    problems.append((key, f"a key of a DICOMweb destination only, {why}"))
            for key in ("IP", "PORT", "AETitleSender", "AETitleTo"):
                if key not in value:
                    problems.append((key, ""))
        if not problems:
            return value
        raise ValidationError.from_exception_data(
            "Destination",
            [
                InitErrorDetails(
                    type=PydanticCustomError("destination_kind", why) if why else "missing",
                    loc=(key,),
                    input=value,
                )
                for key, why in problems
            ],
        )

    @model_validator(mode="after")
    def _tls_over_https(self) -> Destination:
        if (
            self.URL is not None
            and self.tls is not None
            and not self.URL.lower().startswith("https://")
        ):
            raise ValueError(f"tls is for an https:// URL, and URL is {self.URL!r}")
        return self

    @property
    def is_web(self) -> bool:
        return self.URL is not None

    @property
    def label(self) -> str:
        """How the destination is named before `$me`/`$port` are resolved."""
        if self.URL is not None:
            return f"STOW-RS {self.URL}"
        return f"{self.AETitleTo}@{self.IP}:{self.PORT}"

    @field_validator("which", mode="before")
    @classmethod
    def _one_spelling_per_tag(cls, value: Any) -> Any:
        """`"0008,103e"` and `SeriesDescription` in one object would silently merge."""
        if not isinstance(value, list):
            return value
        for i, entry in enumerate(value):
            if not isinstance(entry, dict):
                continue
            seen: dict[str, str] = {}
            for key in entry:
                try:
                    tag = parse_tag(key)
                except ValueError:
                    continue  # reported by the tag's own validation
                if tag in seen:
                    raise ValueError(
                        f"which[{i}] names {tag_label(tag)} twice ({seen[tag]!r} and {key!r})"
                    )
                seen[tag] = key
        return value

    @field_validator("which")
    @classmethod
    def _which_not_empty(cls, value: list[dict[str, str]] | None) -> list[dict[str, str]] | None:
        if value is not None:
            if not value:
                raise ValueError(
                    "an empty list selects no file (a file is sent when it satisfies at least "
                    "one of its objects): leave which out to send every file"
                )
            for i, entry in enumerate(value):
                if not entry:
                    raise ValueError(f"which[{i}] is empty: name at least one tag")
        return value

    def endpoint(self, me: str, port: int, associations: int = 1) -> AnyEndpoint:
        """Replace `$me`/`$port` (only as a field's whole value) with this box's address.

        `associations`: the default of how many associations (DICOMweb: requests) one
        job's files are spread over."""
        tls = self.tls
        options = TlsOptions(tls.ca, tls.cert, tls.key, tls.verify) if tls else None
        if self.URL is not None:
            return WebEndpoint(
                url=self.URL,
                auth=self.auth.model() if self.auth else None,
                tls=options,
                associations=self.associations or associations,
                instances_per_request=self.instances_per_request,
                bytes_per_request=self.bytes_per_request,
            )
        assert self.IP is not None and self.PORT is not None  # checked by _one_kind
        assert self.AETitleTo is not None and self.AETitleSender is not None
        return Endpoint(
            host=me if self.IP == ME else self.IP,
            port=port if self.PORT == PORT else int(self.PORT),
            called_aet=self.AETitleTo,
            calling_aet=self.AETitleSender,
            tls=options,
            associations=self.associations or associations,
            convert=self.convert,
        )


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str | None = None
    AETitleIn: Regex = ".*"
    AETitleFrom: Regex = ".*"
    status: Flag = True
    enabled: Flag = True
    RouteDirectory: Literal["OUTPUT", "INPUT"] = "OUTPUT"
    send: list[dict[Regex, Destination]]
    break_: Flag = Field(False, alias="break")
    error_report: Flag = False
    """Extension: when the computation failed, send a report of proc.json with the files."""

    @field_validator("RouteDirectory", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("send")
    @classmethod
    def _send_not_empty(cls, value: list[dict[str, Destination]]) -> list[dict[str, Destination]]:
        if not value:
            raise ValueError("send lists no destination")
        for i, entry in enumerate(value):
            if not entry:
                raise ValueError(f"send[{i}] is an empty object: map a pattern to a destination")
        return value

    @property
    def active(self) -> bool:
        return self.status and self.enabled


@dataclass(frozen=True)
class SendEntry:
    """One (pattern, destination) pair of a rule's send list, in the order written."""

    index: int
    pattern: str
    destination: Destination


@dataclass(frozen=True)
class RuleSpec:
    """A validated rule with its position and resolved name."""

    index: int
    name: str
    rule: Rule
    entries: tuple[SendEntry, ...]

    @property
    def label(self) -> str:
        return f'rule {self.index} "{self.name}"'

    def uses_tags(self) -> set[str]:
        return {
            tag
            for entry in self.entries
            for which in entry.destination.which or ()
            for tag in which
        }


@dataclass(frozen=True)
class RoutingConfig:
    source: str
    rules: tuple[RuleSpec, ...]
    sha256: str = ""
    """Of the document as parsed (canonical JSON): which version of the rules a run used."""

    @property
    def version(self) -> dict[str, str]:
        """What the record, the report and the run's artifact say of the rules used."""
        return {"source": self.source, "sha256": self.sha256}


def rules_digest(data: Any) -> str:
    """The version of a rules document: the same rules give the same digest, however they
    were spaced, commented or ordered as keys (order of rules and send entries counts)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _describe_loc(loc: tuple[Any, ...]) -> str:
    """('send', 0, 'success', 'PORT') → 'send[0]["success"].PORT'.

    Model fields are shown as `.field`, dict keys (patterns, tags) as `["key"]`, and a
    problem with the key itself ends in ` (key)`.
    """
    fields = set(Rule.model_fields) | set(Destination.model_fields) | set(Auth.model_fields)
    fields |= {"break", "requests", "max_requests"}
    text = ""
    previous: Any = None
    for item in loc:
        if item == "[key]":
            text += " (key)"
        elif isinstance(item, int):
            text += f"[{item}]"
        elif item in fields and not isinstance(previous, int):
            name = "break" if item == "break_" else item
            text += f".{name}" if text else name
        else:
            text += f'["{item}"]' if text else str(item)
        previous = item
    return text


def _format_error(err: dict[str, Any]) -> str:
    loc = _describe_loc(tuple(err["loc"]))
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        *parent, key = err["loc"]
        loc = f"{_describe_loc(tuple(parent))}.{key}" if parent else str(key)
        msg = "unknown key (check its spelling; keys are case-sensitive)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "literal_error":
        msg = f"{msg}, got {err.get('input')!r}"
    return f"{loc}: {msg}" if loc else msg


def _rule_name(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"].strip():
        return raw["name"].strip()
    return f"rule {index}"


def parse_config(data: Any, source: str = "<config>") -> RoutingConfig:
    """Validate parsed JSON; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, ['top level must be an object {"routing": [...]}'])
    problems = [
        f"unknown top-level key {key!r} (expected only 'routing')"
        for key in data
        if key != "routing"
    ]
    raw_rules = data.get("routing")
    if raw_rules is None:
        raise ConfigError(source, [*problems, "missing 'routing': the list of rules"])
    if not isinstance(raw_rules, list):
        raise ConfigError(source, [*problems, "'routing' must be a list of rules"])
    rules: list[RuleSpec] = []
    for index, raw in enumerate(raw_rules, start=1):
        name = _rule_name(raw, index)
        where = f'rule {index} "{name}"'
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be an object, got {type(raw).__name__}")
            continue
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            problems.extend(f"{where}: {_format_error(e)}" for e in exc.errors())
            continue
        entries = tuple(
            SendEntry(index=i, pattern=pattern, destination=dest)
            for i, (pattern, dest) in enumerate(
                ((p, d) for obj in rule.send for p, d in obj.items()), start=1
            )
        )
        rules.append(RuleSpec(index=index, name=name, rule=rule, entries=entries))
    if problems:
        raise ConfigError(source, problems)
    return RoutingConfig(source=source, rules=tuple(rules), sha256=rules_digest(data))


def loads_config(text: str, source: str = "<config>") -> RoutingConfig:
    try:
        data = jsonc.loads(text)
    except jsonc.JsoncError as exc:
        raise ConfigError(source, [f"not valid JSON: {exc}"]) from None
    return parse_config(data, source)


def load_config(path: Path | str) -> RoutingConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    return loads_config(text, str(path))
