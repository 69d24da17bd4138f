"""Which rules apply to a job and which of their send entries match (SPEC section 3)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from router.config import RoutingConfig, RuleSpec, SendEntry
from router.job import Job


def fullmatch(pattern: str, value: str) -> bool:
    """The whole value, any case; `.*` matches everything, the empty string and newlines too."""
    return re.fullmatch(pattern, value, re.IGNORECASE | re.DOTALL) is not None


@dataclass(frozen=True)
class EntryMatch:
    entry: SendEntry
    matches: bool


@dataclass(frozen=True)
class RuleMatch:
    spec: RuleSpec
    applies: bool
    why_not: str | None
    entries: tuple[EntryMatch, ...]
    """Every send entry with whether its pattern matches the job's `success` string."""

    @property
    def matching(self) -> tuple[SendEntry, ...]:
        return tuple(e.entry for e in self.entries if e.matches)


def match_rule(spec: RuleSpec, job: Job) -> RuleMatch:
    rule = spec.rule
    why_not = None
    if not rule.status:
        why_not = "deactivated (status 0)"
    elif not rule.enabled:
        why_not = 'disabled (enabled "F")'
    elif not fullmatch(rule.AETitleIn, job.called):
        why_not = f"AETitleIn {rule.AETitleIn!r} does not match the called AE title {job.called!r}"
    elif not fullmatch(rule.AETitleFrom, job.caller):
        why_not = (
            f"AETitleFrom {rule.AETitleFrom!r} does not match the caller AE title {job.caller!r}"
        )
    entries = tuple(EntryMatch(e, fullmatch(e.pattern, job.success)) for e in spec.entries)
    return RuleMatch(spec, why_not is None, why_not, entries)


def match_rules(config: RoutingConfig, job: Job) -> tuple[RuleMatch, ...]:
    """Every rule in the order written, applying or not, for routing and for `explain`."""
    return tuple(match_rule(spec, job) for spec in config.rules)
