"""Property and fuzz tests: no input crashes the config loader, the job readers or the scan.

Routing files are written by hand and job files by other programs, so both are untrusted.
A sweep must report a bad file and go on; the only acceptable failures are therefore the
documented ones (ConfigError with its problems, JobInvalid naming the file, JobWaiting, a
file skipped with a reason). Anything else would abort the sweep or the CLI with a
traceback. Inputs that once crashed them are kept as regression tests.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import unicodedata
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from router import jsonc
from router.config import ConfigError, RoutingConfig, loads_config, parse_tag
from router.job import INFO, PROC, Job, JobInvalid, JobWaiting, load_job, read_info
from router.select import scan
from tests.factory import write_ct

# These counts keep the whole module around 20 s of CPU on two cores. No deadline: timings
# on a shared CI runner vary too much. The I/O tests use a fresh TemporaryDirectory per
# example rather than the function-scoped tmp_path, which hypothesis would share between
# examples (and warn about).
FAST = settings(max_examples=200, deadline=None)
IO = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Outcome = RoutingConfig | list[str]


def outcome(text: str) -> Outcome:
    """The parse result, or the problems; checks the ConfigError contract on the way."""
    try:
        cfg = loads_config(text)
    except ConfigError as exc:
        assert isinstance(exc.problems, list)
        assert exc.problems, "a ConfigError must say why"
        for problem in exc.problems:
            assert isinstance(problem, str)
            assert problem.strip(), f"empty problem in {exc.problems!r}"
        return exc.problems
    assert isinstance(cfg, RoutingConfig)
    return cfg


def rule_label(raw: Any, position: int) -> str:
    """`rule N "NAME"` as SPEC section 2 documents it (name defaults to `rule N`)."""
    name = raw.get("name") if isinstance(raw, dict) else None
    name = name.strip() if isinstance(name, str) and name.strip() else f"rule {position}"
    return f'rule {position} "{name}"'


# --- JSON values --------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values: SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
garbage = json_values


def mixed(
    valid: SearchStrategy[Any], invalid: SearchStrategy[Any], weight: int = 3
) -> SearchStrategy[Any]:
    """Mostly valid values (`weight` to 1), so that whole rules and jobs are often valid.

    (Repeating a branch in st.one_of does not weight it: identical branches are merged.)
    """
    choice = st.sampled_from([True] * weight + [False])
    return choice.flatmap(lambda ok: valid if ok else invalid)


# --- Field values, valid and invalid ------------------------------------------------------

# Names are free text; some carry comment markers, commas and quotes so that the round trip
# checks that strip_comments leaves strings alone.
valid_names = (
    st.none()
    | st.text(max_size=12)
    | st.sampled_from(
        ["x // y", "/* not a comment */", "a,]", 'quote " inside', "back\\slash", "  padded  "]
    )
)
invalid_names = st.integers() | st.lists(st.text(max_size=3), max_size=2) | st.booleans()

VALID_REGEXES = [".*", "", "success", "succ.*", "PACS|OSIRIX", "(?i)proc.*", r"\d+", "[A-Z]{1,16}"]
# Invalid patterns that re.compile reports as re.error (the others are regression tests below).
INVALID_REGEXES = ["(", "[a-", "*", "a**", "(?P<x", "\\", "(?<=a+)b", "a{2,1}"]
valid_regexes = st.sampled_from(VALID_REGEXES)
regex_keys = st.sampled_from(VALID_REGEXES) | st.sampled_from(INVALID_REGEXES) | st.text(max_size=6)
regexes = mixed(valid_regexes, st.sampled_from(INVALID_REGEXES) | st.text(max_size=6) | garbage)

valid_ports = (
    st.integers(1, 65535)
    | st.integers(1, 65535).map(str)
    | st.sampled_from(["$port", " 104 ", "11112"])
)
invalid_ports = (
    st.integers()
    | st.booleans()
    | st.floats()
    | st.none()
    | st.text(max_size=6)
    | st.sampled_from(["0", "65536", "-1", "1e3", "104.0", "$PORT", "", "٣"])
)

_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\")
valid_aets = st.text(_printable, min_size=1, max_size=16).filter(lambda s: s.strip())
invalid_aets = (
    st.text(max_size=20)
    | st.sampled_from(["", "   ", "A" * 17, "A\\B", "A\x00", "A\nB", "A\tB", "\x7f", 7])
    | garbage
)

VALID_FLAGS = [0, 1, "0", "1", True, False, "T", "F", "t", "f", "true", "false", " 1 "]
INVALID_FLAGS = [2, -1, "2", "maybe", "", None, 1.0, 0.0, 0.5, [], {}, "TF"]
flags = mixed(st.sampled_from(VALID_FLAGS), st.sampled_from(INVALID_FLAGS) | st.text(max_size=4))

VALID_TAGS = ["0008,103e", "(0008,103E)", "0008103e", "SeriesDescription", "Modality", "0010,0010"]
INVALID_TAGS = ["NotAKeyword", "(0008,103e", "0008,103e)", "zzzz,zzzz", "", "0008,10", "8,103e"]
tags = mixed(st.sampled_from(VALID_TAGS), st.sampled_from(INVALID_TAGS) | st.text(max_size=10))

valid_which = st.none() | st.lists(
    st.dictionaries(st.sampled_from(VALID_TAGS), valid_regexes, min_size=1, max_size=2).filter(
        lambda d: len({parse_tag(k) for k in d}) == len(d)  # one spelling per tag
    ),
    min_size=1,
    max_size=2,
)
which = mixed(
    st.none() | st.lists(st.dictionaries(tags, regexes, max_size=3), max_size=3),
    st.sampled_from([[{}], {}, "x", [["a"]], [None]]) | garbage,
)

valid_hosts = st.sampled_from(["127.0.0.1", "$me", "pacs.example.org", "::1", " 10.0.0.1 "])
hosts = mixed(valid_hosts, st.sampled_from(["", " ", "a b", "a\tb", 5, None, []]) | garbage)

valid_dirs = st.sampled_from(["OUTPUT", "INPUT", "output", " Input "])
route_dirs = mixed(valid_dirs, st.sampled_from(["OUT", "", "INPUTS", 1, None]) | garbage)

# Misspellings that must be refused, not ignored (SPEC section 2).
UNKNOWN_DEST_KEYS = ["AETitelTo", "port", "Which", "ip", "timeout"]
UNKNOWN_RULE_KEYS = ["AETitelIn", "Status", "route_directory", "Send", "brake"]


def destinations(valid_only: bool) -> SearchStrategy[Any]:
    if valid_only:
        return st.fixed_dictionaries(
            {
                "IP": valid_hosts,
                "PORT": valid_ports,
                "AETitleSender": valid_aets,
                "AETitleTo": valid_aets,
            },
            optional={"break": st.sampled_from(VALID_FLAGS), "which": valid_which},
        )
    fields = {
        "IP": hosts,
        "PORT": mixed(valid_ports, invalid_ports),
        "AETitleSender": mixed(valid_aets, invalid_aets),
        "AETitleTo": mixed(valid_aets, invalid_aets),
    }
    optional = {"break": flags, "which": which}
    messy = {**fields, **optional, **dict.fromkeys(UNKNOWN_DEST_KEYS, garbage)}
    complete = st.fixed_dictionaries(fields, optional=optional)
    return mixed(complete, st.fixed_dictionaries({}, optional=messy) | garbage)


def rules(valid_only: bool) -> SearchStrategy[Any]:
    if valid_only:
        send = st.lists(
            st.dictionaries(valid_regexes, destinations(True), min_size=1, max_size=2),
            min_size=1,
            max_size=2,
        )
        return st.fixed_dictionaries(
            {"send": send},
            optional={
                "name": valid_names,
                "AETitleIn": valid_regexes,
                "AETitleFrom": valid_regexes,
                "status": st.sampled_from(VALID_FLAGS),
                "enabled": st.sampled_from(VALID_FLAGS),
                "RouteDirectory": valid_dirs,
                "break": st.sampled_from(VALID_FLAGS),
            },
        )
    send = mixed(
        st.lists(st.dictionaries(regex_keys, destinations(False), max_size=2), max_size=2),
        st.sampled_from([[], [{}], "x", {}]) | garbage,
    )
    optional = {
        "name": mixed(valid_names, invalid_names),
        "AETitleIn": regexes,
        "AETitleFrom": regexes,
        "status": flags,
        "enabled": flags,
        "RouteDirectory": route_dirs,
        "break": flags,
    }
    messy = {"send": send, **optional, **dict.fromkeys(UNKNOWN_RULE_KEYS, garbage)}
    complete = st.fixed_dictionaries({"send": send}, optional=optional)
    return mixed(complete, st.fixed_dictionaries({}, optional=messy) | garbage)


valid_configs = st.fixed_dictionaries({"routing": st.lists(rules(True), max_size=3)})
plausible_configs = mixed(
    st.fixed_dictionaries({"routing": st.lists(rules(False) | rules(True), max_size=4)}),
    st.fixed_dictionaries(
        {},
        optional={
            "routing": st.lists(rules(False), max_size=2) | garbage,
            "Routing": garbage,
            "rules": garbage,
        },
    )
    | garbage,
)


# --- 1. loads_config ----------------------------------------------------------------------


@FAST
@given(st.text())
@example("")
@example("{")
@example("/* never closed")
@example('{"routing": [] // trailing comment')
@example('{"routing": [{"send": [{"a": 1}]}],,}')
def test_arbitrary_text_is_a_config_or_a_config_error(text: str) -> None:
    outcome(text)


@FAST
@given(json_values)
def test_arbitrary_json_is_a_config_or_a_config_error(value: Any) -> None:
    outcome(json.dumps(value))


@settings(FAST, max_examples=120)
@given(plausible_configs)
def test_problems_name_the_rule_by_position(data: Any) -> None:
    """Each rule is judged on its own and its problems carry `rule N "NAME"` for its N."""
    result = outcome(json.dumps(data))
    if not (isinstance(data, dict) and isinstance(data.get("routing"), list)):
        assert isinstance(result, list)
        return
    raw_rules = data["routing"]
    expected: list[str] = []
    for position, raw in enumerate(raw_rules, start=1):
        alone = outcome(json.dumps({"routing": [raw]}))
        if isinstance(alone, list):
            first, label = rule_label(raw, 1), rule_label(raw, position)
            for problem in alone:
                assert problem.startswith(first + ": "), problem
                expected.append(label + problem.removeprefix(first))
    extra_keys = [k for k in data if k != "routing"]
    if isinstance(result, RoutingConfig):
        event("valid config")
        assert not expected
        assert not extra_keys
        assert [r.index for r in result.rules] == list(range(1, len(raw_rules) + 1))
        assert [r.label for r in result.rules] == [
            rule_label(raw, n) for n, raw in enumerate(raw_rules, start=1)
        ]
        return
    event("config error")
    top, about_rules = result[: len(extra_keys)], result[len(extra_keys) :]
    for key, problem in zip(extra_keys, top, strict=True):
        assert repr(key) in problem
    assert about_rules == expected


_spaces = st.sampled_from(["", " ", "\n", "\t", "\r\n", "  "])
_line_comments = st.text(st.characters(exclude_characters="\n"), max_size=10).map(
    lambda s: f"//{s}\n"
)
_block_comments = st.text(max_size=10).filter(lambda s: "*/" not in s).map(lambda s: f"/*{s}*/")
gaps = st.lists(_spaces | _line_comments | _block_comments, max_size=2).map("".join)
"""White space and comments, as a person would put them between two tokens."""


def noisy_json(
    value: Any, gap: Callable[[], str], trailing: Callable[[], bool], ascii: bool
) -> str:
    """Serialise like json.dumps, with gaps between tokens and some trailing commas."""

    def noisy(v: Any) -> str:
        return noisy_json(v, gap, trailing, ascii)

    if isinstance(value, dict):
        items = [
            f"{gap()}{json.dumps(k, ensure_ascii=ascii)}{gap()}:{noisy(v)}"
            for k, v in value.items()
        ]
        comma = "," if items and trailing() else ""
        return "{" + ",".join(items) + comma + gap() + "}"
    if isinstance(value, list):
        items = [noisy(v) for v in value]
        comma = "," if items and trailing() else ""
        return "[" + ",".join(items) + comma + gap() + "]"
    return gap() + json.dumps(value, ensure_ascii=ascii) + gap()


@settings(FAST, max_examples=120)
@given(
    st.one_of(valid_configs, plausible_configs),
    st.lists(gaps, min_size=1, max_size=6),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_comments_and_trailing_commas_do_not_change_the_result(
    data: Any, pool: list[str], rnd: random.Random, ascii: bool
) -> None:
    """Gaps come from a small drawn pool, picked by a seeded Random: cheap to generate."""
    plain = outcome(json.dumps(data))

    def gap() -> str:
        return rnd.choice(pool)

    noisy = gap() + noisy_json(data, gap, lambda: rnd.random() < 0.5, ascii) + gap()
    assert outcome(noisy) == plain, noisy
    if isinstance(plain, RoutingConfig):
        event("valid config")


@settings(FAST, max_examples=40)
@given(valid_configs)
def test_valid_configs_are_accepted(data: Any) -> None:
    """Guards the strategies above: the valid half really is valid."""
    assert isinstance(outcome(json.dumps(data)), RoutingConfig)


# --- 2. jsonc.strip_comments --------------------------------------------------------------

jsonc_text = st.text(st.sampled_from('/*"\\,]}[{\n \r\ta1:') | st.characters(), max_size=60)


@FAST
@given(jsonc_text)
@example('"a // b" // c\n/* d\n e */ [1, /* f */ ]')
@example('"unterminated \\')
@example("[1,]\n{,}")
def test_strip_comments_blanks_and_keeps_positions(text: str) -> None:
    """Blanking (not removing) keeps the line and column of a later syntax error right."""
    try:
        out = jsonc.strip_comments(text)
    except jsonc.JsoncError as exc:
        assert "/*" in text and exc.line and exc.column
        assume(False)
        return
    assert len(out) == len(text)
    assert [i for i, c in enumerate(out) if c == "\n"] == [
        i for i, c in enumerate(text) if c == "\n"
    ]
    assert all(o == t or o == " " for o, t in zip(out, text, strict=True))
    assert jsonc.strip_comments(out) == out
    if "/" not in text and "," not in text:
        assert out == text


# --- 3. Job readers -----------------------------------------------------------------------

FOLDER = object()
"""Marker: the job file exists as a folder instead of a file."""

text_values = st.text(max_size=12) | st.sampled_from(['"PACS"', ' "PROCRSI" ', "", "  "])
_info_fields = {
    "AETitleCalled": mixed(text_values, garbage, weight=6),
    "AETitleCaller": mixed(text_values, garbage, weight=6),
}
_info_extras = {"CallerIP": garbage, "received": garbage, "extra": garbage}
info_like = mixed(
    st.fixed_dictionaries(_info_fields, optional=_info_extras),
    st.fixed_dictionaries({}, optional={**_info_fields, **_info_extras}),
    weight=6,
)
_proc_extras = {"message": garbage, "other": garbage}
proc_entry = mixed(
    st.fixed_dictionaries(
        {"success": mixed(text_values, garbage, weight=6)}, optional=_proc_extras
    ),
    st.fixed_dictionaries({}, optional={"success": garbage, **_proc_extras}),
    weight=6,
)
proc_like = proc_entry | st.lists(proc_entry, max_size=3)


def encoded(values: SearchStrategy[Any]) -> SearchStrategy[bytes]:
    """JSON text in the encodings that other programs actually write."""
    return st.builds(
        lambda v, enc: json.dumps(v, ensure_ascii=False).encode(enc, errors="replace"),
        values,
        st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]),
    )


def job_files(shaped: SearchStrategy[Any]) -> SearchStrategy[Any]:
    """Mostly well-formed UTF-8 JSON of the expected shape, so that whole jobs load too."""
    return mixed(
        st.builds(lambda v: json.dumps(v).encode(), shaped),
        st.one_of(
            st.none(),
            st.just(FOLDER),
            st.binary(max_size=64),
            encoded(json_values),
            encoded(shaped),
        ),
    )


def put(path: Path, content: Any) -> None:
    if content is FOLDER:
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)


@IO
@given(job_files(info_like), job_files(proc_like))
def test_load_job_returns_a_job_or_a_documented_error(info: Any, proc: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = Path(tmp)
        put(job_dir / INFO, info)
        put(job_dir / PROC, proc)
        try:
            job = load_job(job_dir)
        except JobWaiting:
            assert proc is None, "JobWaiting although proc.json exists"
            read_info(job_dir)  # info.json was fine: it is checked first
            return
        except JobInvalid as exc:
            assert exc.file in (job_dir / INFO, job_dir / PROC)
            assert isinstance(exc.problem, str) and exc.problem.strip()
            if exc.file == job_dir / PROC:
                assert proc is not None
                read_info(job_dir)  # blamed proc.json: info.json must be fine
            else:
                with pytest.raises(JobInvalid):  # blamed info.json: it is bad on its own
                    read_info(job_dir)
            event(f"invalid {exc.file.name}")
            return
        event("job")
        assert isinstance(job, Job)
        assert info is not None and proc is not None
        for text in (job.called, job.caller, job.success, job.message):
            assert isinstance(text, str)
        assert job.proc and all(isinstance(p, dict) for p in job.proc)
        assert job.success == job.proc[0]["success"]


# --- 4. select.scan -----------------------------------------------------------------------

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]


@cache
def real_dicom(transfer_syntax: str) -> bytes:
    """One small, valid CT file per transfer syntax, built once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_ct(Path(tmp) / "ct.dcm", transfer_syntax=transfer_syntax, rows=4, cols=4)
        return path.read_bytes()


@st.composite
def truncated(draw: DrawFn) -> bytes:
    data = real_dicom(draw(st.sampled_from(TRANSFER_SYNTAXES)))
    return data[: draw(st.just(len(data)) | st.integers(0, len(data)))]


@st.composite
def mutated(draw: DrawFn) -> bytes:
    """A real file with a few bytes of its header changed, then perhaps cut short."""
    data = bytearray(real_dicom(draw(st.sampled_from(TRANSFER_SYNTAXES))))
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(132, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(132, len(data)))])


VRS = [b"UI", b"OB", b"UL", b"SQ", b"UN", b"ZZ", b"\x00\x00"]
preamble = st.binary(min_size=128, max_size=128)
dicm_then_garbage = st.builds(lambda p, tail: p + b"DICM" + tail, preamble, st.binary(max_size=200))
dicm_then_meta_garbage = st.builds(
    lambda p, elem, vr, length, tail: p + b"DICM\x02\x00" + elem + vr + length + tail,
    preamble,
    st.binary(min_size=2, max_size=2),
    st.sampled_from(VRS),
    st.binary(min_size=2, max_size=6),
    st.binary(max_size=120),
)
dicom_like = st.one_of(
    st.binary(max_size=300),
    dicm_then_garbage,
    dicm_then_meta_garbage,
    truncated(),
    mutated(),
)
SCAN_TAGS = ["0008103E", "00080060", "00100010", "00080008", "00200013", "00091001", "7FE00010"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's warnings about the garbage
@IO
@given(
    st.lists(dicom_like, min_size=1, max_size=3),
    st.lists(st.sampled_from(SCAN_TAGS), unique=True, max_size=3),
)
@example([b""], [])
@example([b"\0" * 128 + b"DICM"], ["0008103E"])
def test_scan_parses_or_skips_every_file(contents: list[bytes], wanted: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = Path(tmp)
        relpaths = []
        for i, content in enumerate(contents):
            rel = f"OUTPUT/{'sub/' * (i % 2)}f{i}.dcm"
            (job_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (job_dir / rel).write_bytes(content)
            relpaths.append(rel)
        result = scan(job_dir, "OUTPUT", wanted)
    seen = [f.relpath for f in result.files] + [s.relpath for s in result.skipped]
    seen += [u.relpath for u in result.unsendable]
    assert sorted(seen) == sorted(relpaths)
    for skipped in result.skipped:
        assert skipped.reason.strip(), f"{skipped.relpath} skipped without a reason"
        # only what is not an instance, or a second copy of one, is skipped
        assert "DICM" in skipped.reason or skipped.reason.startswith("same SOPInstanceUID")
    for bad in result.unsendable:
        event("unsendable")
        reason = bad.reason.removeprefix("damaged DICOM file:").strip()
        assert reason, f"{bad.relpath} unsendable without a reason: {bad.reason!r}"
        assert bad.permanent  # the bytes themselves are wrong: no retry helps
    for file in result.files:
        event("parsed")
        assert file.sop_class_uid and file.sop_instance_uid and file.transfer_syntax_uid
        assert set(file.values) == set(wanted)
        assert all(isinstance(v, str) for v in file.values.values())


@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES)
def test_whole_real_files_are_parsed(tmp_path: Path, transfer_syntax: str) -> None:
    """Guards the fuzzing above: uncut files do reach the parsed side."""
    (tmp_path / "OUTPUT").mkdir()
    (tmp_path / "OUTPUT" / "ct.dcm").write_bytes(real_dicom(transfer_syntax))
    result = scan(tmp_path, "OUTPUT", ["00080008", "00080060"])
    assert not result.skipped
    assert result.files[0].values == {"00080008": "ORIGINAL\\PRIMARY\\AXIAL", "00080060": "CT"}


# --- Known bugs: the correct behaviour, kept visible until fixed --------------------------

DEEP = "[" * 100_000
DEEP_CLOSED = '{"routing": ' + "[" * 100_000 + "]" * 100_000 + "}"
HUGE_INT = "1" * 5_000
"""Beyond the int-from-text limit that Python sets since 3.11 (and 3.10.7)."""
needs_int_limit = pytest.mark.skipif(
    not hasattr(sys, "get_int_max_str_digits"), reason="no int-from-text limit here"
)


@pytest.mark.parametrize("text", [DEEP, DEEP_CLOSED], ids=["unclosed", "closed"])
def test_deeply_nested_config_is_a_config_error(text: str) -> None:
    assert isinstance(outcome(text), list)


@pytest.mark.parametrize(
    "pattern",
    ["a{4294967296}", "a{1,99999999999999999999}", "(" * 5_000 + ")" * 5_000],
    ids=["repeat", "range", "nested"],
)
def test_uncompilable_regex_is_a_config_error(pattern: str) -> None:
    dest = {"IP": "h", "PORT": 104, "AETitleSender": "A", "AETitleTo": "B"}
    problems = outcome(
        json.dumps({"routing": [{"name": "r", "AETitleIn": pattern, "send": [{".*": dest}]}]})
    )
    assert isinstance(problems, list)
    assert problems[0].startswith('rule 1 "r": AETitleIn: ')


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param(PROC, DEEP, id="proc-deep"),
        pytest.param(PROC, HUGE_INT, id="proc-huge-int", marks=needs_int_limit),
        pytest.param(
            PROC,
            '[{"success": "success", "message": ' + HUGE_INT + "}]",
            id="proc-message-huge-int",
            marks=needs_int_limit,
        ),
        pytest.param(
            INFO,
            '{"AETitleCalled": "A", "AETitleCaller": "B", "n": ' + HUGE_INT + "}",
            id="info-huge-int",
            marks=needs_int_limit,
        ),
        pytest.param(INFO, "[" * 100_000 + "]" * 100_000, id="info-deep"),
    ],
)
def test_undecodable_job_file_is_invalid(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / INFO).write_text('{"AETitleCalled": "A", "AETitleCaller": "B"}')
    (tmp_path / PROC).write_text('[{"success": "success"}]')
    (tmp_path / name).write_text(text)
    with pytest.raises(JobInvalid) as info:
        load_job(tmp_path)
    assert info.value.file == tmp_path / name


@pytest.mark.parametrize("text", ["[,]", "{,}", '{"routing": [,]}', '{"routing": [ , // x\n]}'])
def test_lone_comma_is_not_a_trailing_comma(text: str) -> None:
    with pytest.raises(jsonc.JsoncError):
        jsonc.loads(text)


def _dicom_ae(value: str) -> bool:
    """What pynetdicom (and PS3.5 AE) allow: ASCII, 1-16 chars, no backslash or control.

    Leading and trailing spaces are not significant.
    """
    value = value.strip(" ")
    return (
        1 <= len(value) <= 16
        and value.isascii()
        and "\\" not in value
        and not any(unicodedata.category(c).startswith("C") for c in value)
    )


@FAST
@given(st.text(max_size=18) | valid_aets)
@example("é")
def test_accepted_ae_titles_are_usable_by_pynetdicom(ae: str) -> None:
    """Refused at load time, not by pynetdicom at every send; and valid ones are accepted."""
    dest = {"IP": "h", "PORT": 104, "AETitleSender": ae, "AETitleTo": "PACS"}
    result = outcome(json.dumps({"routing": [{"send": [{".*": dest}]}]}))
    if isinstance(result, RoutingConfig):
        assert _dicom_ae(result.rules[0].entries[0].destination.AETitleSender)
    else:
        assert not _dicom_ae(ae)


def test_one_tag_twice_in_a_which_object_is_refused() -> None:
    which = [{"0008,103e": "A.*", "SeriesDescription": "B.*"}]
    dest = {"IP": "h", "PORT": 104, "AETitleSender": "A", "AETitleTo": "B", "which": which}
    problems = outcome(json.dumps({"routing": [{"send": [{".*": dest}]}]}))
    assert isinstance(problems, list)
