"""The schema checker the node CLI tests rely on does reject what it must."""

from __future__ import annotations

from tests.netns.node_cli_schemas import CONNECTIONS, STATUS, OneOf, Opt, errors


def test_conforming_values_pass():
    assert (
        errors({"a": [1, 2], "b": None, "c": "x"}, {"a": [int], "b": Opt(str), "c": OneOf("x")})
        == []
    )
    assert errors({"k": 1.5, "j": 2}, {"*": float}) == []


def test_each_kind_of_departure_is_reported_with_its_path():
    schema = {"a": [int], "b": Opt(str), "c": OneOf("x"), "d": {"e": bool}}
    value = {"a": [1, "2"], "b": 3, "c": "y", "d": {"e": 1}, "extra": 0}
    assert sorted(errors(value, schema)) == sorted(
        [
            "$: unexpected 'extra'",
            "$.a[1]: expected int, got '2'",
            "$.b: expected str, got 3",
            "$.c: 'y' not one of ('x',)",
            "$.d.e: expected bool, got 1",
        ]
    )
    assert errors({}, {"a": int}) == ["$: missing 'a'"]
    assert errors([], {"a": int}) == ["$: expected an object, got list"]


def test_the_published_schemas_reject_a_truncated_answer():
    assert errors({"problems": []}, STATUS)
    assert errors({"connections": [{"direction": "sideways"}], "problems": []}, CONNECTIONS)
