"""The routing configuration model: what is accepted, and how refusals read."""

from __future__ import annotations

import json

import pytest

from router.config import ConfigError, load_config, loads_config, parse_tag

DEST = {"IP": "127.0.0.1", "PORT": 11112, "AETitleSender": "ROUTER", "AETitleTo": "PACS"}


def config(*rules: dict) -> str:
    return json.dumps({"routing": list(rules)})


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads_config(text, "routing.json")
    return info.value.problems


SEED_STYLE = """
{ "routing": [
    {
      "name": "Default Rule for OUTPUT to OsiriX",
      "AETitleIn": ".*",
      "status": 0,
      "send": [ { ".*": { "IP": "$me", "PORT": "$port",
                          "AETitleSender": "ProcDefault", "AETitleTo": "OsiriX" } } ],
      "break": 0
    },
    {
      "name": "ProcRSI bucket routing of results",
      "AETitleIn": "ProcRSI",
      "AETitleFrom": "PACS",
      "send": [
        { "success": { "IP": "10.1.1.1", "PORT": "403", "AETitleSender": "me",
                       "AETitleTo": "PACS", "break": 1, "which": [ { "0008,103e": ".*" } ] },
          "failed":  { "IP": "10.1.1.2", "PORT": "403", "AETitleSender": "me",
                       "AETitleTo": "PACS", "break": 1, },
        },
      ],
      "break": 0
    },
    {
      "name": "Route Input to PACS",
      "RouteDirectory": "INPUT", // default value is "OUTPUT"
      "AETitleIn": ".*",
      "enabled": "F",
      /* a block
         comment */
      "send": [ { ".*": { "IP": "$me", "PORT": "$port",
                          "AETitleSender": "ProcDefault", "AETitleTo": "PACS1" } } ],
    },
] }
"""


def test_seed_example_with_comments_and_trailing_commas_loads() -> None:
    cfg = loads_config(SEED_STYLE)
    names = [r.name for r in cfg.rules]
    assert names == [
        "Default Rule for OUTPUT to OsiriX",
        "ProcRSI bucket routing of results",
        "Route Input to PACS",
    ]
    first, second, third = cfg.rules
    assert not first.rule.active and second.rule.active and not third.rule.active
    assert third.rule.RouteDirectory == "INPUT"
    assert [(e.index, e.pattern) for e in second.entries] == [(1, "success"), (2, "failed")]
    success = second.entries[0].destination
    assert success.PORT == 403 and success.break_ is True
    assert success.which == [{"0008103E": ".*"}]
    endpoint = first.entries[0].destination.endpoint("192.0.2.7", 4242)
    assert (endpoint.host, endpoint.port, endpoint.called_aet) == ("192.0.2.7", 4242, "OsiriX")


def test_comment_markers_inside_strings_are_kept() -> None:
    cfg = loads_config(config({"name": "a // b /* c */", "send": [{"x,]": DEST}]}))
    assert cfg.rules[0].name == "a // b /* c */"
    assert cfg.rules[0].entries[0].pattern == "x,]"


def test_defaults() -> None:
    spec = loads_config(config({"send": [{".*": DEST}]})).rules[0]
    assert spec.name == "rule 1"
    rule = spec.rule
    assert (rule.AETitleIn, rule.AETitleFrom, rule.RouteDirectory) == (".*", ".*", "OUTPUT")
    assert rule.active and rule.break_ is False
    assert spec.entries[0].destination.which is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, False),
        (1, True),
        ("0", False),
        ("1", True),
        (True, True),
        (False, False),
        ("T", True),
        ("F", False),
        ("t", True),
        ("f", False),
        ("true", True),
        ("false", False),
    ],
)
def test_flags(value: object, expected: bool) -> None:
    rule = loads_config(config({"status": value, "send": [{".*": DEST}]})).rules[0].rule
    assert rule.status is expected


def test_unknown_key_is_refused_with_rule_and_field() -> None:
    found = problems(config({"name": "CT out", "AETitelIn": "X", "send": [{".*": DEST}]}))
    assert found == [
        'rule 1 "CT out": AETitelIn: unknown key (check its spelling; keys are case-sensitive)'
    ]


def test_every_problem_is_listed_with_rule_position_name_and_field() -> None:
    bad_dest = {**DEST, "PORT": 70000, "AETitleTo": "A" * 17, "IP": "", "break": 2}
    found = problems(
        config(
            {"name": "ok", "send": [{".*": DEST}]},
            {"name": "broken", "AETitleIn": "(", "send": [{"succ(": bad_dest}]},
            {"send": [{".*": {**DEST, "which": [{"0008,103x": ".*"}]}}], "RouteDirectory": "X"},
        )
    )
    text = "\n".join(found)
    assert 'rule 2 "broken": AETitleIn: invalid regular expression' in text
    assert 'rule 2 "broken": send[0]["succ("] (key): invalid regular expression' in text
    assert 'rule 2 "broken": send[0]["succ("].PORT: expected a port number 1-65535' in text
    assert 'rule 2 "broken": send[0]["succ("].AETitleTo: AE title' in text
    assert 'rule 2 "broken": send[0]["succ("].IP: expected a host name' in text
    assert 'rule 2 "broken": send[0]["succ("].break: expected 0/1' in text
    assert 'rule 3 "rule 3": send[0][".*"].which[0]["0008,103x"] (key): unknown DICOM tag' in text
    assert "rule 3 \"rule 3\": RouteDirectory: Input should be 'OUTPUT' or 'INPUT', got 'X'" in text
    assert not any("rule 1" in p for p in found)


@pytest.mark.parametrize(
    ("dest", "needle"),
    [
        ({k: v for k, v in DEST.items() if k != "PORT"}, "PORT: required key is missing"),
        ({**DEST, "PORT": "abc"}, "expected a port number"),
        ({**DEST, "PORT": 0}, "expected a port number"),
        ({**DEST, "PORT": True}, "expected a port number"),
        ({**DEST, "AETitleSender": "A\\B"}, "backslash"),
        ({**DEST, "AETitleSender": "A\tB"}, "control characters"),
        ({**DEST, "AETitleSender": ""}, "1 to 16 characters"),
        ({**DEST, "which": [{}]}, "which[0] is empty"),
        ({**DEST, "which": []}, 'send[0][".*"].which: an empty list selects no file'),
        ({**DEST, "which": {"Modality": "CT"}}, "which"),
        ({**DEST, "Port": 104}, "Port: unknown key"),
    ],
)
def test_destination_problems(dest: dict, needle: str) -> None:
    found = problems(config({"name": "r", "send": [{".*": dest}]}))
    assert any(needle in p for p in found), found
    assert all(p.startswith('rule 1 "r": send[0][".*"]') for p in found), found


def test_port_as_numeric_string_and_placeholders() -> None:
    dest = {**DEST, "PORT": " 4006 "}
    assert (
        loads_config(config({"send": [{".*": dest}]})).rules[0].entries[0].destination.PORT == 4006
    )
    dest = {**DEST, "IP": "$me", "PORT": "$port"}
    endpoint = loads_config(config({"send": [{".*": dest}]})).rules[0].entries[0].destination
    assert endpoint.endpoint("127.0.0.1", 104).port == 104
    # only a field's whole value is a placeholder
    dest = {**DEST, "IP": "$me.example"}
    assert (
        loads_config(config({"send": [{".*": dest}]}))
        .rules[0]
        .entries[0]
        .destination.endpoint("127.0.0.1", 104)
        .host
        == "$me.example"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "top level must be an object"),
        ("{}", "missing 'routing'"),
        ('{"routing": {}}', "'routing' must be a list"),
        ('{"routing": [1]}', 'rule 1 "rule 1": must be an object'),
        ('{"routing": [], "rules": []}', "unknown top-level key 'rules'"),
        ('{"routing": [{"send": []}]}', "send lists no destination"),
        ('{"routing": [{"send": [{}]}]}', "send[0] is an empty object"),
        ('{"routing": [{"name": "x"}]}', 'rule 1 "x": send: required key is missing'),
        ('{"routing": [ /* open', "comment opened with /* is never closed"),
        ('{"routing": [}', "not valid JSON: line 1"),
        ('{"routing": [], "routing": []}', "duplicate key 'routing'"),
    ],
)
def test_structure_problems(text: str, problem: str) -> None:
    assert any(problem in p for p in problems(text)), problems(text)


def test_multiple_keys_in_one_send_object_keep_their_order() -> None:
    send = [{"b": DEST, "a": DEST}, {"c": DEST}]
    entries = loads_config(config({"send": send})).rules[0].entries
    assert [e.pattern for e in entries] == ["b", "a", "c"]
    assert [e.index for e in entries] == [1, 2, 3]


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("0008,103e", "0008103E"),
        ("(0008,103E)", "0008103E"),
        ("0008103e", "0008103E"),
        ("SeriesDescription", "0008103E"),
        (" (0010,0010) ", "00100010"),
    ],
)
def test_tag_forms(text: str, tag: str) -> None:
    assert parse_tag(text) == tag


@pytest.mark.parametrize("text", ["0008,103", "(0008,103E", "SeriesDescriptio", "", "zzzz,zzzz"])
def test_bad_tags(text: str) -> None:
    with pytest.raises(ValueError, match="unknown DICOM tag"):
        parse_tag(text)


def test_load_config_names_the_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="missing.json: file not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"routing": [{"send": [{".*": {"IP": "h"}}]}]}')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value).startswith(f"{bad}: ")
    assert info.value.source == str(bad)
