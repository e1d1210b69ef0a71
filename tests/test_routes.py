"""Aliases without the model (server/routes.py): split accuracy, sticky assignment, the share of
subjects a weight change moves, and the routes file's parsing and its errors."""

from __future__ import annotations

import json
import math
import random

import pytest

from loraplex.server.routes import RouteError, parse_route, read_routes_file

N = 10_000


def three_sigma(n: int, p: float) -> float:
    return 3 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("weights", [{"v7": 90, "v8": 10}, {"a": 1, "b": 2, "c": 3, "d": 0}, {"x": 0.5, "y": 0.5}])
@pytest.mark.parametrize("sticky", [False, True])
def test_split_accuracy(weights, sticky):
    """10,000 decisions land within 3 sigma of each weight (random without a subject, hashed with one)."""
    route = parse_route("support", {"versions": weights})
    rng = random.Random(1234)
    counts = dict.fromkeys(weights, 0)
    for i in range(N):
        counts[route.choose(f"user-{i}" if sticky else None, rng)] += 1
    total = sum(weights.values())
    for version, weight in weights.items():
        p = weight / total
        assert abs(counts[version] - N * p) <= three_sigma(N, p), (version, counts)
    assert counts.get("d", 0) == 0  # a zero weight never serves


def test_sticky_same_subject_same_version_across_reloads():
    body = {"versions": {"support-v7": 70, "support-v8": 30}}
    first = parse_route("support", body)
    again = parse_route("support", json.loads(json.dumps(body)))  # a reload: a new, equal route
    reordered = parse_route("support", {"versions": {"support-v8": 30, "support-v7": 70}})
    for i in range(2000):
        subject = f"user-{i}"
        chosen = first.choose(subject)
        assert all(chosen == first.choose(subject) for _ in range(3))
        assert again.choose(subject) == chosen == reordered.choose(subject)


@pytest.mark.parametrize(
    "before, after",
    [
        ({"v7": 90, "v8": 10}, {"v7": 80, "v8": 20}),
        ({"v7": 50, "v8": 50}, {"v7": 0, "v8": 100}),
        ({"a": 60, "b": 30, "c": 10}, {"a": 60, "b": 30, "c": 25}),
        ({"a": 60, "b": 30, "c": 10}, {"a": 60, "b": 30}),
    ],
)
def test_weight_change_moves_only_the_expected_share(before, after):
    """Raising one version's weight (or dropping one) moves subjects only to the versions whose share
    grew, and about as many as the growth: moving 10% -> 20% moves about the extra 10% of subjects."""
    old, new = parse_route("s", {"versions": before}), parse_route("s", {"versions": after})
    moved, to = 0, dict.fromkeys(after, 0)
    for i in range(N):
        a, b = old.choose(f"u{i}"), new.choose(f"u{i}")
        if a != b:
            moved += 1
            to[b] += 1
            assert after[b] / sum(after.values()) > before.get(b, 0) / sum(before.values()), (a, b)
    expected = sum(max(0.0, after[v] / sum(after.values()) - before[v] / sum(before.values())) for v in after)
    assert abs(moved - N * expected) <= three_sigma(N, expected) + 1, (moved, expected)


def test_general_weight_change_never_moves_subjects_to_a_lowered_version():
    """With several weights changed at once, a subject may move between versions (rendezvous hashing is
    minimal per single change), but never towards a version whose weight went down."""
    before, after = {"a": 60, "b": 30, "c": 10}, {"a": 50, "b": 30, "c": 20}
    old, new = parse_route("s", {"versions": before}), parse_route("s", {"versions": after})
    moved = [(old.choose(f"u{i}"), new.choose(f"u{i}")) for i in range(N)]
    moved = [(a, b) for a, b in moved if a != b]
    assert moved and all(b != "a" for _, b in moved)
    assert len(moved) < 0.3 * N  # at most the sum of the raised shares plus the shuffle, far from all


def test_shadow_sampling_fraction():
    route = parse_route("s", {"versions": {"v1": 1}, "shadow": {"version": "v2", "fraction": 0.1}})
    rng = random.Random(5)
    hits = sum(route.wants_shadow(rng) for _ in range(N))
    assert abs(hits - N * 0.1) <= three_sigma(N, 0.1)
    assert not parse_route("s", {"versions": {"v1": 1}}).wants_shadow()


def test_split_and_json():
    route = parse_route("support", {"versions": {"v7": 90, "v8": 10}, "shadow": {"version": "v9", "fraction": 0.1}})
    assert route.split() == {"v7": 90.0, "v8": 10.0}
    assert route.to_json() == {"versions": {"v7": 90, "v8": 10}, "shadow": {"version": "v9", "fraction": 0.1}}
    assert route.names() == {"v7", "v8", "v9"}


@pytest.mark.parametrize(
    "alias, body, words",
    [
        ("s", {"versions": {}}, "non-empty"),
        ("s", {"versions": {"v": -1}}, "weight must be a number >= 0"),
        ("s", {"versions": {"v": "ten"}}, "weight must be a number >= 0"),
        ("s", {"versions": {"v": 0}}, "at least one weight"),
        ("s", {"versions": {"s": 1}}, "cannot route to itself"),
        ("s", {"versions": {"v": 1}, "extra": 1}, "'versions' and optional 'shadow'"),
        ("s", {"versions": {"v": 1}, "shadow": {"version": "w"}}, "'version' and 'fraction'"),
        ("s", {"versions": {"v": 1}, "shadow": {"version": "w", "fraction": 2}}, "in [0, 1]"),
        ("../s", {"versions": {"v": 1}}, "valid model name"),
        ("s", ["v"], "is an object"),
    ],
)
def test_bad_routes_are_refused(alias, body, words):
    with pytest.raises(RouteError) as err:
        parse_route(alias, body)
    assert words in err.value.message and err.value.status == 400


def test_routes_file_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "routes.yaml"
    yaml_file.write_text(
        "support:\n  versions: {support-v7: 90, support-v8: 10}\n  shadow: {version: support-v9, fraction: 0.1}\n"
        "legal:\n  versions:\n    legal-v2: 1\n"
    )
    table = read_routes_file(yaml_file)
    assert [r.alias for r in table] == ["legal", "support"]
    assert table.get("support").split() == {"support-v7": 90.0, "support-v8": 10.0}
    json_file = tmp_path / "routes.json"
    json_file.write_text(json.dumps(table.to_json()))
    assert read_routes_file(json_file).to_json() == table.to_json()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert list(read_routes_file(empty)) == []
    assert table.users_of("support-v9") == ["support"] and table.without("support").users_of("support-v9") == []


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("bad.yaml", "support: {versions: [unclosed", "not valid YAML"),
        ("bad.json", '{"support": ', "not valid JSON"),
        ("list.yaml", "- support\n", "mapping each alias"),
        ("weights.yaml", "support: {versions: {v7: -5}}\n", "support.versions.v7: the weight"),
    ],
)
def test_malformed_routes_file(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RouteError) as err:
        read_routes_file(path)
    assert words in err.value.message and str(path) in err.value.message
    with pytest.raises(RouteError, match="cannot read"):
        read_routes_file(tmp_path / "missing.yaml")
