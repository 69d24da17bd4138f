"""What a routing run did: per rule, per send entry, and for the job as a whole.

The same report feeds the CLI's `--json`, the Prefect table artifact, the record's `end`
line and the routing log, so users see one account of a run wherever they look.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from router.text import printable, printable_data

EntryState = Literal["succeeded", "failed", "skipped"]


@dataclass
class Delivery:
    """The sending of one entry's selected files to one destination, over all attempts."""

    destination: str
    selected: int
    key: str = ""
    """The destination's stable key (`Endpoint.key`), for the job's status."""
    already: int = 0
    """Selected instances the record showed as stored there before this run."""
    stored: int = 0
    """Stored by this run."""
    failed: int = 0
    attempts: int = 0
    seconds: float = 0.0
    bytes: int = 0
    """Of the files this entry stored (their size on disk)."""
    error: str | None = None
    transient: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Up to a few failed files with their status and reason, for the report."""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.error is None


@dataclass
class EntryOutcome:
    index: int
    pattern: str
    destination: str
    break_: bool
    state: EntryState
    selected: int = 0
    excluded: int = 0
    covered: bool = False
    """Failed, but a later entry of the rule succeeded: a primary with an alternative."""
    delivery: Delivery | None = None
    reason: str | None = None


@dataclass
class RuleOutcome:
    index: int
    name: str
    applied: bool
    why_not: str | None = None
    directory: str = "OUTPUT"
    entries: list[EntryOutcome] = field(default_factory=list)
    not_matching: list[int] = field(default_factory=list)
    """Entries whose pattern does not match the job's success string."""
    not_evaluated: list[int] = field(default_factory=list)
    """Entries left after a successful entry with break: 1."""
    stopped_later_rules: bool = False

    @property
    def failed(self) -> bool:
        return any(e.state == "failed" and not e.covered for e in self.entries)

    @property
    def succeeded(self) -> bool:
        return not self.failed and any(e.state == "succeeded" for e in self.entries)


@dataclass
class JobReport:
    job: str
    called: str
    caller: str
    success: str
    message: str
    forced: bool
    run_id: str = ""
    origin: str = ""
    """Who asked for this run ("cli", "sweep", "prefect, flow run NAME (ID)", ...)."""
    rules_version: dict[str, str] = field(default_factory=dict)
    """Source (file or block) and sha256 of the rules this run used."""
    started: str = ""
    finished: str = ""
    rules: list[RuleOutcome] = field(default_factory=list)
    not_evaluated_rules: list[int] = field(default_factory=list)
    skipped_files: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    """Files that are not instances (not DICOM, DICOMDIR) or links not followed, per folder."""

    @property
    def failed_rules(self) -> list[RuleOutcome]:
        return [r for r in self.rules if r.failed]

    @property
    def state(self) -> Literal["routed", "failed"]:
        return "failed" if self.failed_rules else "routed"

    def reason(self) -> str | None:
        if not self.failed_rules:
            return None
        parts = []
        for rule in self.failed_rules:
            for e in rule.entries:
                if e.state == "failed" and not e.covered:
                    parts.append(f'rule {rule.index} "{rule.name}" → {e.destination}: {e.reason}')
        return printable("; ".join(parts))

    def deliveries(self) -> list[Delivery]:
        return [e.delivery for r in self.rules for e in r.entries if e.delivery is not None]

    def rows(self) -> list[dict[str, Any]]:
        """One row per evaluated send entry: the "what went where" table."""
        rows = []
        for rule in self.rules:
            for e in rule.entries:
                d = e.delivery
                rows.append(
                    {
                        "rule": f"{rule.index} {rule.name}",
                        "entry": e.index,
                        "pattern": e.pattern,
                        "destination": e.destination,
                        "outcome": "failed (covered)" if e.covered else e.state,
                        "selected": e.selected,
                        "already there": d.already if d else 0,
                        "stored now": d.stored if d else 0,
                        "failed": d.failed if d else 0,
                        "attempts": d.attempts if d else 0,
                        "send seconds": round(d.seconds, 3) if d else 0.0,
                        "reason": e.reason or "",
                    }
                )
        return printable_data(rows)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state
        data["reason"] = self.reason()
        for rule, raw in zip(self.rules, data["rules"], strict=True):
            raw["failed"] = rule.failed
            raw["succeeded"] = rule.succeeded
            for entry in raw["entries"]:
                entry["break"] = entry.pop("break_")
        return printable_data(data)  # type: ignore[no-any-return]
