"""The feature resolver and definition rules (spec 5.2, 5.4): the spec's seven-feature example
set case by case, and Hypothesis properties of the resolution rules. Pure: no database."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from factories import SEVEN_FEATURES
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pie.errors import Unprocessable
from pie.tenancy.features import (
    Resolver,
    definition_problems,
    merge_patch,
    resolve_features,
    validate_feature_definitions,
)

# -- the spec's example set ----------------------------------------------------------------------

FULL = {
    "route": "Adelaide to Sydney",
    "competitor_count": 4,
    "advertising_spend": 37.5,
    "on_demand": False,
    "weekly_demand": [10, 12.5, 0, 7, 9, 30, 1],
    "origin_destination_pair": ["Adelaide", "Sydney"],
    "market_ref": "auction",
}


def test_seven_feature_set_is_valid_and_normalised():
    assert validate_feature_definitions(copy.deepcopy(SEVEN_FEATURES)) == SEVEN_FEATURES
    assert definition_problems(SEVEN_FEATURES) == []


def test_seven_feature_set_resolves_a_complete_service():
    resolved, failures = resolve_features(FULL, SEVEN_FEATURES)
    assert failures == [] and resolved == FULL


def test_only_route_is_mandatory():
    resolved, failures = resolve_features({"route": "Sydney to Adelaide"}, SEVEN_FEATURES)
    assert failures == [] and resolved == {"route": "Sydney to Adelaide"}
    resolved, failures = resolve_features({}, SEVEN_FEATURES)
    assert resolved == {} and [(f.feature, f.value, f.reason) for f in failures] == [
        ("route", None, "missing mandatory feature")
    ]


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("route", "Adelaide to Sydney", True),
        ("route", "adelaide to sydney", False),
        ("competitor_count", 0, True),
        ("competitor_count", 20, True),
        ("competitor_count", 21, False),
        ("competitor_count", -1, False),
        ("competitor_count", 2.5, False),
        ("competitor_count", True, False),  # a boolean is not an integer in JSON Schema
        ("competitor_count", "3", False),
        ("advertising_spend", 100, True),
        ("advertising_spend", 0.01, True),
        ("advertising_spend", 100.5, False),
        ("on_demand", True, True),
        ("on_demand", 1, False),
        ("weekly_demand", [0, 0, 0, 0, 0, 0, 0], True),
        ("weekly_demand", [1, 2, 3, 4, 5, 6], False),
        ("weekly_demand", [1, 2, 3, 4, 5, 6, 7, 8], False),
        ("weekly_demand", [1, 2, 3, -4, 5, 6, 7], False),
        ("weekly_demand", [1, 2, 3, "4", 5, 6, 7], False),
        # a tuple: prefixItems + items: false
        ("origin_destination_pair", ["Adelaide", "Sydney"], True),
        ("origin_destination_pair", ["Adelaide"], False),
        ("origin_destination_pair", ["Adelaide", "Sydney", "Hobart"], False),
        ("origin_destination_pair", ["Adelaide", 7], False),
        ("origin_destination_pair", "Adelaide-Sydney", False),
        # a union: oneOf string enum | non-negative integer
        ("market_ref", "spot", True),
        ("market_ref", "auction", True),
        ("market_ref", 0, True),
        ("market_ref", 42, True),
        ("market_ref", "barter", False),
        ("market_ref", -3, False),
        ("market_ref", 1.5, False),
        ("market_ref", None, False),
    ],
)
def test_seven_feature_values(name, value, ok):
    provided = {"route": "Adelaide to Sydney", name: value}
    resolved, failures = resolve_features(provided, SEVEN_FEATURES)
    if ok:
        assert failures == [] and resolved[name] == value
    else:
        assert name not in resolved
        assert [(f.feature, f.value) for f in failures] == [(name, value)]
        assert failures[0].reason  # names why


def test_unknown_keys_rejected_or_ignored():
    provided = {"route": "Adelaide to Sydney", "cabin": "deck"}
    resolved, failures = resolve_features(provided, SEVEN_FEATURES)
    assert resolved == {"route": "Adelaide to Sydney"}
    assert [(f.feature, f.value, f.reason) for f in failures] == [
        ("cabin", "deck", "unknown feature (not in the schema)")
    ]
    resolved, failures = resolve_features(provided, SEVEN_FEATURES, unknown="ignore")
    assert failures == [] and resolved == {"route": "Adelaide to Sydney"}


def test_memo_keeps_true_one_and_one_point_zero_apart():
    resolver = Resolver(SEVEN_FEATURES)
    for value, ok in ((1, True), (True, False), (1.0, True), (False, False), (0, True)):
        _, failures = resolver.resolve({"route": "Adelaide to Sydney", "competitor_count": value})
        assert (failures == []) is ok, value
    for value, ok in ((True, True), (1, False)):
        _, failures = resolver.resolve({"route": "Adelaide to Sydney", "on_demand": value})
        assert (failures == []) is ok, value


def test_memo_validates_each_distinct_value_once():
    resolver = Resolver(SEVEN_FEATURES)
    for index in range(1000):
        resolver.resolve(
            {"route": "Adelaide to Sydney", "competitor_count": index % 5, "weekly_demand": [index % 2] * 7}
        )
    # route (1 value) + competitor_count (5) + weekly_demand (2)
    assert resolver.validations == 8


def test_defaults_fill_in_and_are_validated_definitions():
    definitions = validate_feature_definitions(
        [
            {"name": "cabin", "json_schema": {"type": "string", "default": "deck"}, "mandatory": True},
            {"name": "berths", "json_schema": {"type": "integer", "default": 2}},
        ]
    )
    assert [d["mandatory"] for d in definitions] == [True, False]
    assert resolve_features({}, definitions) == ({"cabin": "deck", "berths": 2}, [])
    assert resolve_features({"berths": 4}, definitions) == ({"cabin": "deck", "berths": 4}, [])


@pytest.mark.parametrize(
    ("definitions", "culprit"),
    [
        ("not a list", "list"),
        ([{"name": "a", "json_schema": {}}, {"name": "a", "json_schema": {}}], "repeats"),
        ([{"name": "has space", "json_schema": {}}], "name must match"),
        ([{"name": "", "json_schema": {}}], "name must match"),
        ([{"name": "x" * 65, "json_schema": {}}], "name must match"),
        ([{"name": 5, "json_schema": {}}], "name must match"),
        ([{"name": "a"}], "json_schema is required"),
        ([{"name": "a", "json_schema": "string"}], "must be an object"),
        ([{"name": "a", "json_schema": {"type": 12}}], "not a valid Draft 2020-12 schema"),
        ([{"name": "a", "json_schema": {"minimum": "zero"}}], "not a valid Draft 2020-12 schema"),
        ([{"name": "a", "json_schema": {"type": "integer", "default": 1.5}}], "default does not validate"),
        (
            [{"name": "a", "json_schema": {"prefixItems": [{"type": "string"}], "items": False, "default": [1]}}],
            "default",
        ),
        ([{"name": "a", "json_schema": {}, "mandatory": "true"}], "mandatory must be a boolean"),
        ([7], "not an object"),
    ],
)
def test_invalid_definitions(definitions, culprit):
    problems = definition_problems(definitions)
    assert problems and any(culprit in p for p in problems), problems
    with pytest.raises(Unprocessable) as info:
        validate_feature_definitions(definitions)
    assert info.value.message.startswith("invalid feature definitions")


# -- Hypothesis: the resolution rules --------------------------------------------------------------

NAMES = st.sampled_from(["route", "cabin", "fare", "berths", "pair", "ref", "flag", "spend"])
UNKNOWN_NAMES = st.sampled_from(["colour", "deck_level", "zz_extra"])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=6))


def _integer_kind(draw) -> tuple[dict, Any, Any]:
    low = draw(st.integers(-50, 50))
    high = draw(st.integers(low, low + 100))
    return (
        {"type": "integer", "minimum": low, "maximum": high},
        st.integers(low, high),
        st.one_of(
            st.integers(high + 1, high + 1000), st.integers(low - 1000, low - 1), st.text(max_size=3), st.booleans()
        ),
    )


def _enum_kind(draw) -> tuple[dict, Any, Any]:
    options = draw(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4, unique=True))
    return (
        {"type": "string", "enum": options},
        st.sampled_from(options),
        st.one_of(st.text(max_size=5).filter(lambda s: s not in options), st.integers(), st.none()),
    )


def _boolean_kind(draw) -> tuple[dict, Any, Any]:
    return {"type": "boolean"}, st.booleans(), st.one_of(st.integers(), st.text(max_size=3), st.none())


def _number_kind(draw) -> tuple[dict, Any, Any]:
    return (
        {"type": "number", "minimum": 0, "maximum": 100},
        st.one_of(st.integers(0, 100), st.floats(0, 100, allow_nan=False)),
        st.one_of(st.floats(100.5, 1e6), st.floats(-1e6, -0.5), st.text(max_size=3)),
    )


def _tuple_kind(draw) -> tuple[dict, Any, Any]:
    return (
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False, "minItems": 2},
        st.tuples(st.text(max_size=4), st.integers()).map(list),
        st.one_of(
            st.tuples(st.text(max_size=4), st.integers(), JSON_SCALARS).map(list),
            st.tuples(st.integers(), st.text(max_size=4)).map(list),
            st.lists(st.text(max_size=3), max_size=1),
            st.text(max_size=3),
        ),
    )


def _union_kind(draw) -> tuple[dict, Any, Any]:
    return (
        {"oneOf": [{"type": "string", "enum": ["spot", "auction"]}, {"type": "integer", "minimum": 0}]},
        st.one_of(st.sampled_from(["spot", "auction"]), st.integers(0, 10_000)),
        st.one_of(st.integers(-10_000, -1), st.sampled_from(["barter", ""]), st.none(), st.booleans()),
    )


KINDS = [_integer_kind, _enum_kind, _boolean_kind, _number_kind, _tuple_kind, _union_kind]


@st.composite
def feature_sets(draw):
    """(definitions, valid-value strategies, invalid-value strategies) with unique names."""
    names = draw(st.lists(NAMES, min_size=1, max_size=6, unique=True))
    definitions, valid, invalid = [], {}, {}
    for name in names:
        schema, good, bad = draw(st.sampled_from(KINDS))(draw)
        if draw(st.booleans()):
            schema = {**schema, "default": draw(good)}
        definitions.append({"name": name, "json_schema": schema, "mandatory": draw(st.booleans())})
        valid[name], invalid[name] = good, bad
    return definitions, valid, invalid


@st.composite
def scenarios(draw):
    """A feature set and a provided dict: each defined feature absent, valid or invalid, plus
    some unknown keys. Returns what each feature was meant to be."""
    definitions, valid, invalid = draw(feature_sets())
    provided: dict[str, Any] = {}
    intent: dict[str, str] = {}
    for definition in definitions:
        name = definition["name"]
        choice = draw(st.sampled_from(["absent", "valid", "invalid"]))
        intent[name] = choice
        if choice == "valid":
            provided[name] = draw(valid[name])
        elif choice == "invalid":
            provided[name] = draw(invalid[name])
    unknown = draw(st.dictionaries(UNKNOWN_NAMES, JSON_SCALARS, max_size=2))
    provided.update(unknown)
    return definitions, provided, intent, unknown


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(feature_sets())
def test_generated_definitions_are_valid(generated):
    definitions, _, _ = generated
    assert definition_problems(definitions) == []
    assert validate_feature_definitions(definitions) == definitions


@PROPERTY
@given(scenarios())
def test_resolution_rules(scenario):
    definitions, provided, intent, unknown = scenario
    for mode in ("reject", "ignore"):
        resolved, failures = resolve_features(provided, definitions, unknown=mode)
        by_feature: dict[str, list] = {}
        for failure in failures:
            by_feature.setdefault(failure.feature, []).append(failure)
        for definition in definitions:
            name, schema = definition["name"], definition["json_schema"]
            if intent[name] == "valid":
                # 1. the provided value, validated
                assert resolved[name] == provided[name] and name not in by_feature
            elif intent[name] == "invalid":
                assert name not in resolved
                assert [(f.value, bool(f.reason)) for f in by_feature[name]] == [(provided[name], True)]
            elif "default" in schema:
                # 2. the schema default
                assert resolved[name] == schema["default"] and name not in by_feature
            elif definition["mandatory"]:
                # 3. mandatory without default: a failure with a null value
                assert name not in resolved
                assert [(f.value, f.reason) for f in by_feature[name]] == [(None, "missing mandatory feature")]
            else:
                # 3. optional without default: left out
                assert name not in resolved and name not in by_feature
        # unknown keys never reach resolved; rejected or ignored by mode
        assert set(resolved) <= {d["name"] for d in definitions}
        unknown_failures = {f.feature: f.value for f in failures if f.feature in unknown}
        assert unknown_failures == (unknown if mode == "reject" else {})


@PROPERTY
@given(scenarios())
def test_a_successful_resolution_is_a_fixed_point(scenario):
    definitions, provided, _, _ = scenario
    resolved, failures = resolve_features(provided, definitions, unknown="ignore")
    if not failures:
        assert resolve_features(resolved, definitions) == (resolved, [])


@PROPERTY
@given(st.lists(scenarios(), min_size=1, max_size=5), st.data())
def test_a_shared_resolver_matches_fresh_resolutions(scenario_list, data):
    """The per-(feature, value) memo never changes an answer."""
    definitions = scenario_list[0][0]
    resolver = Resolver(definitions)
    providers = [s[1] for s in scenario_list] + [s[1] for s in scenario_list]  # repeats hit the memo
    for provided in providers:
        mode = data.draw(st.sampled_from(["reject", "ignore"]))
        assert resolver.resolve(provided, unknown=mode) == resolve_features(provided, definitions, unknown=mode)


@PROPERTY
@given(
    st.dictionaries(NAMES, JSON_SCALARS, max_size=6),
    st.dictionaries(NAMES, st.one_of(st.none(), JSON_SCALARS), max_size=6),
)
def test_merge_patch(provided, patch):
    before = dict(provided), dict(patch)
    merged = merge_patch(provided, patch)
    assert (provided, patch) == before  # inputs untouched
    for key, value in patch.items():
        if value is None:
            assert key not in merged
        else:
            assert merged[key] == value
    for key, value in provided.items():
        if key not in patch:
            assert merged[key] == value
    assert set(merged) == (set(provided) | {k for k, v in patch.items() if v is not None}) - {
        k for k, v in patch.items() if v is None
    }
    assert merge_patch(merged, patch) == merged  # idempotent


# -- the fast validity check agrees with jsonschema ------------------------------------------------

from jsonschema import Draft202012Validator  # noqa: E402

from pie.tenancy.features import compile_check  # noqa: E402

JSON_SCALAR_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-6, 6),
    st.integers(-6, 6).map(float),  # integral floats: integers to JSON Schema, not to Python's type()
    st.floats(-20, 20, allow_nan=False, allow_infinity=False),
    st.text(alphabet="ab1 ", max_size=4),
)
JSON_VALUES = st.recursive(
    JSON_SCALAR_VALUES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), children, max_size=3),
    ),
    max_leaves=8,
)
# top-level values: scalars and shallow containers of scalars often, deeper values sometimes
TOP_VALUES = st.one_of(
    JSON_SCALAR_VALUES,
    st.lists(JSON_SCALAR_VALUES, max_size=4),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), JSON_SCALAR_VALUES, max_size=3),
    JSON_VALUES,
)
TYPES = ["null", "boolean", "integer", "number", "string", "array", "object"]


def _leaf_schemas():
    number = st.one_of(st.integers(-5, 5), st.sampled_from([0.5, -1.5, 2.0]))
    size = st.integers(0, 3)
    return st.one_of(
        st.booleans(),
        st.builds(lambda t: {"type": t}, st.sampled_from(TYPES)),
        st.builds(lambda ts: {"type": ts}, st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True)),
        st.builds(lambda e: {"enum": e}, st.lists(JSON_VALUES, min_size=1, max_size=3)),
        st.builds(lambda c: {"const": c}, JSON_VALUES),
        st.builds(
            lambda k, n: {k: n}, st.sampled_from(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]), number
        ),
        st.builds(
            lambda k, n: {k: n},
            st.sampled_from(["minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"]),
            size,
        ),
        st.builds(lambda p: {"pattern": p}, st.sampled_from(["^a", "b$", "1", "^$"])),
        st.builds(lambda r: {"required": r}, st.lists(st.sampled_from(["a", "b"]), max_size=2, unique=True)),
        st.just({"format": "date-time", "description": "annotations only"}),
    )


SCHEMAS = st.recursive(
    _leaf_schemas(),
    lambda children: st.one_of(
        st.builds(
            lambda k, subs: {k: subs},
            st.sampled_from(["oneOf", "anyOf", "allOf"]),
            st.lists(children, min_size=1, max_size=3),
        ),
        st.builds(lambda sub: {"not": sub}, children),
        st.builds(lambda sub: {"items": sub}, children),
        st.builds(lambda subs: {"prefixItems": subs}, st.lists(children, min_size=1, max_size=3)),
        st.builds(
            lambda subs, rest: {"prefixItems": subs, "items": rest},
            st.lists(children, min_size=1, max_size=2),
            children,
        ),
        st.builds(
            lambda props, extra: {"properties": props, **({} if extra is None else {"additionalProperties": extra})},
            st.dictionaries(st.sampled_from(["a", "b"]), children, max_size=2),
            st.one_of(st.none(), children),
        ),
        st.builds(lambda extra: {"additionalProperties": extra}, children),
        st.builds(lambda a, b: {**a, **b} if isinstance(a, dict) and isinstance(b, dict) else a, children, children),
    ),
    max_leaves=6,
)


def boundary_values(schema: Any) -> list[Any]:
    """Values at the edges of the constants a schema mentions (n, n±1, n±0.5, as floats; each
    string and its neighbours; each enum/const member and shallow containers of them)."""
    found: list[Any] = []

    def walk(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            if key in ("enum",):
                found.extend(node)
            for v in node:
                walk(v, key)
        elif isinstance(node, bool):
            return
        elif isinstance(node, (int, float)):
            found.extend([node, node + 1, node - 1, node + 0.5, node - 0.5, float(node)])
        elif isinstance(node, str) and key not in ("type",):
            found.extend([node, node.strip("^$"), "a" + node.strip("^$"), node.strip("^$") + "b", ""])
            if key == "required":
                found.extend([{node: 1}, {"c": 1}])
        if key == "const":
            found.append(node)

    walk(schema)
    shallow = [[v] for v in found[:6]] + [{"a": v} for v in found[:6]] + [{"b": v} for v in found[:3]]
    return found + shallow


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEMAS, st.lists(TOP_VALUES, min_size=1, max_size=8))
@example({"type": "integer"}, [1.0, True, 1, 1.5])
@example({"type": "number"}, [False, 0, 0.5])
@example({"type": "boolean"}, [0, 1, True])
@example({"enum": [1, "a", [1]]}, [True, 1.0, [True], [1.0], "a"])
@example({"const": {"a": False}}, [{"a": 0}, {"a": False}])
@example({"oneOf": [{"type": "integer"}, {"type": "number"}]}, [1, 1.5, 2.0])
@example({"prefixItems": [{"type": "string"}], "items": False}, [["a"], ["a", "b"], [], "ab"])
@example({"properties": {"a": {"type": "string"}}, "additionalProperties": False}, [{"a": "x"}, {"b": 1}, []])
@example({"minimum": 1, "exclusiveMaximum": 3}, [True, 1, 3, 2.999, "5"])
def test_fast_check_agrees_with_jsonschema(schema, values):
    values = values + boundary_values(schema)
    check = compile_check(schema)
    assert check is not None, schema  # every generated keyword is in the supported subset
    validator = Draft202012Validator(schema)
    for value in values:
        assert check(value) == validator.is_valid(value), (schema, value)


def test_fast_check_declines_unsupported_keywords():
    for schema in (
        {"$ref": "#/$defs/x", "$defs": {"x": {"type": "string"}}},
        {"uniqueItems": True},
        {"if": {"type": "string"}, "then": {"minLength": 1}},
        {"type": "array", "contains": {"type": "integer"}},
        {"multipleOf": 0.1},
        {"patternProperties": {"^a": {"type": "string"}}, "properties": {}},
        {"items": {"$ref": "#"}},
        {"type": "decimal"},
    ):
        assert compile_check(schema) is None, schema


def test_the_seven_features_compile():
    for definition in SEVEN_FEATURES:
        assert compile_check(definition["json_schema"]) is not None, definition["name"]
