"""Which rules apply to a job and which of their send entries match (SPEC section 3).

Patterns are matched with RE2 (google-re2), whose matching time grows linearly with the
value: a pattern such as `(a+)+$`, which makes Python's `re` backtrack for minutes on a
64-character SeriesDescription, cannot stall routing. Patterns that need backtracking
(backreferences, lookaround) are refused when the rules are validated (`compile_pattern`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import re2

from router.config import RoutingConfig, RuleSpec, SendEntry
from router.job import Job


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re2._Regexp:
    """The pattern as RE2 matches it: any case, `.` matching newlines too.

    ValueError with RE2's reason when it cannot be matched in linear time or is malformed.
    """
    options = re2.Options()
    options.case_sensitive = False
    options.dot_nl = True
    options.log_errors = False  # the reason is raised, not written to stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(str(reason)) from None


def fullmatch(pattern: str, value: str) -> bool:
    """The whole value, any case; `.*` matches everything, the empty string and newlines too."""
    return compile_pattern(pattern).fullmatch(value) is not None


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
