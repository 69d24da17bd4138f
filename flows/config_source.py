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

from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from pydantic import Field

from router.config import ConfigError, RoutingConfig, load_config, parse_config
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
    source = block_source(name)
    try:
        block = RoutingRules.load(name, validate=False)
    except ValueError as exc:
        if "Unable to find block document" in str(exc) or isinstance(exc.__cause__, ObjectNotFound):
            raise ConfigError(
                source,
                [
                    "not found: push rules with `dicom-router config push FILE`, "
                    "or give a file with --config / DICOM_ROUTER_CONFIG"
                ],
            ) from None
        raise
    return parse_config(block.rules, source)


def resolve_config(settings: Settings) -> RoutingConfig:
    """The file if one is set, otherwise the block; ConfigError names the source."""
    if settings.config is not None:
        return load_config(settings.config)
    return load_block_config(settings.config_block)


def push_config(config: RoutingConfig, raw: dict[str, Any], name: str) -> None:
    """Store validated rules as the block (the caller validated `raw` into `config`)."""
    RoutingRules.register_type_and_schema()
    RoutingRules(rules=raw).save(name, overwrite=True)


def pull_config(name: str) -> dict[str, Any]:
    try:
        return RoutingRules.load(name, validate=False).rules
    except ValueError as exc:
        raise ConfigError(block_source(name), [f"cannot load: {exc}"]) from None
