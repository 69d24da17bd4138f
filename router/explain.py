"""What routing a job would do, without sending: for users debugging their rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from router import allowlist
from router.config import RoutingConfig
from router.job import Job
from router.record import Record
from router.route import scan_tags
from router.rules import match_rules
from router.select import Scan, scan, select
from router.settings import Settings


@dataclass
class EntryView:
    index: int
    pattern: str
    matches: bool
    destination: str
    break_: bool
    selected: list[str] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)
    unsendable: list[tuple[str, str]] = field(default_factory=list)
    """Files it would send that the check refuses or that cannot be read, with why."""
    already: int = 0
    refusal: str | None = None
    """Why nothing would go to this destination (the allow-list), if so."""


@dataclass
class RuleView:
    index: int
    name: str
    applies: bool
    why_not: str | None
    directory: str
    break_: bool
    entries: list[EntryView]


def explain(
    job: Job, config: RoutingConfig, settings: Settings
) -> tuple[list[RuleView], dict[str, Scan]]:
    """Every rule and entry with why it applies or not and which files each would get."""
    record = Record(job.path)
    scans: dict[str, Scan] = {}
    views = []
    for match in match_rules(config, job):
        rule = match.spec.rule
        entries = []
        for em in match.entries:
            dest = em.entry.destination
            endpoint = dest.endpoint(settings.me, settings.port, settings.associations)
            view = EntryView(
                index=em.entry.index,
                pattern=em.entry.pattern,
                matches=em.matches,
                destination=str(endpoint),
                break_=dest.break_,
            )
            view.refusal = allowlist.refusal(settings.allowlist, endpoint)
            if match.applies and em.matches and not view.refusal:
                directory = rule.RouteDirectory
                if directory not in scans:
                    scans[directory] = scan(job.path, directory, scan_tags(config, directory))
                folder = scans[directory]
                sel = select(folder.files, dest.which, folder.unsendable)
                view.selected = [f.relpath for f in sel.selected]
                view.excluded = [(f.relpath, why) for f, why in sel.excluded]
                view.unsendable = [(u.relpath, u.reason) for u in sel.unsendable]
                stored = record.stored_at(endpoint.key)
                view.already = sum(1 for f in sel.selected if f.sop_instance_uid in stored)
            entries.append(view)
        views.append(
            RuleView(
                index=match.spec.index,
                name=match.spec.name,
                applies=match.applies,
                why_not=match.why_not,
                directory=rule.RouteDirectory,
                break_=rule.break_,
                entries=entries,
            )
        )
    return views, scans


def render(
    job: Job, views: list[RuleView], scans: dict[str, Scan], limit: int = 10
) -> Iterator[str]:
    """Plain text lines, so the output reads the same on a terminal and in a pipe."""
    yield f"job {job.path}"
    yield f"  called {job.called!r}, caller {job.caller!r}, success {job.success!r}"
    for folder, result in scans.items():
        yield (
            f"  {folder}/: {len(result.files)} DICOM file(s), {len(result.skipped)} skipped, "
            f"{len(result.unsendable)} that cannot be sent"
        )
        if result.note:
            yield f"    {result.note}"
        for s in result.skipped[:limit]:
            yield f"    skipped {s.relpath}: {s.reason}"
        for u in result.unsendable[:limit]:
            kind = "damaged" if u.permanent else "unreadable"
            yield f"    ! {u.relpath} ({kind}): {u.reason}"
    for rule in views:
        head = f'rule {rule.index} "{rule.name}"'
        if not rule.applies:
            yield f"{head}: does not apply: {rule.why_not}"
            continue
        yield f"{head}: applies (sends {rule.directory}/{', break: 1' if rule.break_ else ''})"
        for e in rule.entries:
            label = f"  entry {e.index} {e.pattern!r} → {e.destination}"
            if not e.matches:
                yield f"{label}: pattern does not match success {job.success!r}"
                continue
            brk = "; break: 1 (later entries only if this send fails)" if e.break_ else ""
            if e.refusal:
                yield f"{label}: would fail: {e.refusal}"
                continue
            if e.unsendable:
                yield (
                    f"{label}: would fail: {len(e.unsendable)} file(s) it selects cannot be "
                    f"sent; {len(e.selected)} file(s) would go, {e.already} already there{brk}"
                )
            elif not e.selected:
                yield f"{label}: no file selected, would be skipped{brk}"
            else:
                yield (
                    f"{label}: {len(e.selected)} file(s), {e.already} already there "
                    f"per the record{brk}"
                )
            for path in e.selected[:limit]:
                yield f"      + {path}"
            if len(e.selected) > limit:
                yield f"      + ... {len(e.selected) - limit} more"
            for path, why in e.unsendable[:limit]:
                yield f"      ! {path}: {why}"
            for path, why in e.excluded[:limit]:
                yield f"      - {path}: {why}"
            if len(e.excluded) > limit:
                yield f"      - ... {len(e.excluded) - limit} more excluded"
        if rule.break_:
            yield "  break: 1 — later rules are evaluated only if this rule fails or sends nothing"
