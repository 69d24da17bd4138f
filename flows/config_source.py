"""Where the routing rules come from: a file, or a block edited in the Prefect UI.

A file given with `--config` or `DICOM_ROUTER_CONFIG` always wins. Without one, the rules
are the block `dicom-routing-rules/<name>` (the `config_block` setting, `default` unless
set), which a PACS administrator edits in the Prefect UI. A block rather than a Variable
because Variables hold at most 5,000 characters. The block's content is loose JSON on
purpose: an edit is stored as typed, and validated with the same model and messages as
`dicom-router validate` every time a run loads it, so an invalid edit makes routing refuse
with the error, and never half-applies.
"""

from __future__ import annotations

from typing import Any

from prefect import get_client
from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from pydantic import Field

from router.config import ConfigError, RoutingConfig, load_config, parse_config
from router.record import now
from router.settings import Settings

BLOCK_TYPE = "dicom-routing-rules"


class RoutingRules(Block):
    """The router's rules, `{"routing": [RULE, ...]}`, as documented in the README."""

    _block_type_name = "DICOM Routing Rules"
    _block_type_slug = BLOCK_TYPE
    _description = (
        'Routing rules of dicom-router: JSON {"routing": [...]}, validated when a job is '
        "routed; `dicom-router validate` explains every problem."
    )

    rules: dict[str, Any] = Field(
        default_factory=lambda: {"routing": []},
        description='The whole routing document: {"routing": [RULE, ...]}.',
    )


def block_source(name: str) -> str:
    return f"Prefect block {BLOCK_TYPE}/{name}"


def load_block_config(name: str) -> RoutingConfig:
    """The rules block, validated; a version not yet in the trail is added to it (an edit
    in the UI, seen by the first run that loads it)."""
    source = block_source(name)
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name, BLOCK_TYPE)
        except ObjectNotFound:
            raise ConfigError(
                source,
                [
                    "not found: push rules with `dicom-router config push FILE`, "
                    "or give a file with --config / DICOM_ROUTER_CONFIG"
                ],
            ) from None
    raw = document.data.get("rules")
    config = parse_config(raw, source)
    when = document.updated.isoformat() if document.updated else None
    record_version(name, raw, config.sha256, "edited in the Prefect UI", when)
    return config


def resolve_config(settings: Settings) -> RoutingConfig:
    """The file if one is set, otherwise the block; ConfigError names the source."""
    if settings.config is not None:
        return load_config(settings.config)
    return load_block_config(settings.config_block)


def push_config(config: RoutingConfig, raw: dict[str, Any], name: str) -> None:
    """Store validated rules as the block (the caller validated `raw` into `config`)."""
    RoutingRules.register_type_and_schema()
    RoutingRules(rules=raw).save(name, overwrite=True)
    record_version(name, raw, config.sha256, f"pushed from {config.source}", None)


# --- the trail of versions ----------------------------------------------------------------

HISTORY_TYPE = "dicom-routing-rules-history"
HISTORY_KEPT = 200
"""Versions kept in the trail, newest last."""


class RoutingRulesHistory(Block):
    """Every version of a rules block: when, its sha256, how it came, and the rules."""

    _block_type_name = "DICOM Routing Rules History"
    _block_type_slug = HISTORY_TYPE
    _description = (
        "The trail of dicom-router's rules blocks, kept by `config push` and by the runs "
        "that first load an edit made in the UI. Read it with `dicom-router config history`."
    )

    versions: list[dict[str, Any]] = Field(default_factory=list)


def history(name: str) -> list[dict[str, Any]]:
    """The trail of the rules block `name`, oldest first (empty if none was kept yet)."""
    try:
        return list(RoutingRulesHistory.load(name, validate=False).versions)
    except ValueError as exc:
        if "Unable to find block document" in str(exc) or isinstance(exc.__cause__, ObjectNotFound):
            return []
        raise


def record_version(
    name: str, raw: Any, sha256: str, how: str, when: str | None
) -> dict[str, Any] | None:
    """Add this version to the trail unless it is the last one there; the new entry or None.

    Two runs that see one edit at once may both add it: the trail shows it once (same
    sha256 in a row).
    """
    versions = history(name)
    if versions and versions[-1].get("sha256") == sha256:
        return None
    entry = {"time": when or now(), "recorded": now(), "sha256": sha256, "how": how, "rules": raw}
    versions = [*versions, entry][-HISTORY_KEPT:]
    RoutingRulesHistory.register_type_and_schema()
    RoutingRulesHistory(versions=versions).save(name, overwrite=True)
    return entry


def pull_config(name: str) -> dict[str, Any]:
    try:
        return RoutingRules.load(name, validate=False).rules
    except ValueError as exc:
        raise ConfigError(block_source(name), [f"cannot load: {exc}"]) from None
