"""Aliases: a public model name routed to weighted adapter versions (pure Python, no engine needed).

A route's body, the same in the routes file (keyed by alias) and in `PUT /v1/routes/{alias}`:

    {"versions": {"support-v7": 90, "support-v8": 10},
     "shadow": {"version": "support-v9", "fraction": 0.1}}      # optional

Weights are non-negative numbers (relative, they need not sum to 100); at least one is positive.

Choosing a version. With a subject (the OpenAI `user` field, or the `X-Loraplex-Subject` header) the
choice is weighted rendezvous hashing: every version scores `weight / -ln(u)`, where `u` in (0, 1) is
a hash of (alias, subject, version), and the highest score wins. The same subject gets the same
version for as long as the weights stay the same (across reloads and restarts: the hash has no
per-process salt), a version wins a subject with probability weight / total, and a weight change
moves only the subjects it has to: raising support-v8 from 10 to 20 raises only its own scores, so
subjects move to it and never between other versions, about the extra 10% of them (dropping a
version likewise moves only its own subjects). Changing several weights at once composes such
moves, and a subject never moves to a version whose weight went down. Without a subject the choice
is random by weight.

A RouteTable is immutable; the server swaps the whole table in one assignment, so a request sees
either the old routes or the new ones, and keeps the version it was routed to until it finishes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError

ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/@:]{0,127}")
MAX_VERSIONS = 64
_TWO_64 = float(2**64)


class RouteError(InvalidRequestError):
    """A route or routes file that cannot be used (400 over HTTP)."""

    def __init__(self, message: str, param: str | None = "routes") -> None:
        super().__init__(message, param=param, code="invalid_route")


@dataclass(frozen=True)
class Shadow:
    version: str
    fraction: float  # of the route's requests that also run on `version`


@dataclass(frozen=True)
class Route:
    alias: str
    versions: tuple[tuple[str, float], ...]  # (version, weight) in the order given
    shadow: Shadow | None = None
    total: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", sum(w for _, w in self.versions))

    def split(self) -> dict[str, float]:
        """Each version's share of traffic in percent (what /v1/models shows)."""
        return {v: round(100.0 * w / self.total, 4) for v, w in self.versions}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"versions": {v: _plain(w) for v, w in self.versions}}
        if self.shadow is not None:
            out["shadow"] = {"version": self.shadow.version, "fraction": self.shadow.fraction}
        return out

    def names(self) -> set[str]:
        """Every adapter the route may run (weighted versions and the shadow)."""
        return {v for v, _ in self.versions} | ({self.shadow.version} if self.shadow else set())

    def choose(self, subject: str | None, rng: random.Random | None = None) -> str:
        """The version that serves a request: sticky for a subject, random by weight without one."""
        live = [(v, w) for v, w in self.versions if w > 0]
        if subject is None:
            x = (rng or random).random() * self.total
            for version, weight in live:
                x -= weight
                if x < 0:
                    return version
            return live[-1][0]
        return max(live, key=lambda vw: vw[1] / -math.log(_unit(self.alias, subject, vw[0])))[0]

    def wants_shadow(self, rng: random.Random | None = None) -> bool:
        return self.shadow is not None and (rng or random).random() < self.shadow.fraction


def _plain(weight: float) -> float | int:
    return int(weight) if float(weight).is_integer() else weight


def _unit(alias: str, subject: str, version: str) -> float:
    """A uniform number in (0, 1) fixed by (alias, subject, version): BLAKE2b, not Python's salted hash."""
    data = "\x00".join((alias, subject, version)).encode("utf-8", "surrogatepass")
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    return (h + 0.5) / _TWO_64


def parse_route(alias: str, body: Any, where: str = "") -> Route:
    """A Route from its JSON body; RouteError naming the field on any mistake."""
    at = f"{where}{alias}"
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias) or ".." in alias:
        raise RouteError(f"{at!r}: an alias must be a valid model name (letters, digits, '._-/@:')")
    if not isinstance(body, dict) or set(body) - {"versions", "shadow"}:
        raise RouteError(f"{at}: a route is an object with 'versions' and optional 'shadow'")
    versions = body.get("versions")
    if not isinstance(versions, dict) or not versions:
        raise RouteError(f"{at}.versions: must be a non-empty object mapping versions to weights")
    if len(versions) > MAX_VERSIONS:
        raise RouteError(f"{at}.versions: at most {MAX_VERSIONS} versions")
    pairs = []
    for version, weight in versions.items():
        if not isinstance(version, str) or not version:
            raise RouteError(f"{at}.versions: version names must be non-empty strings")
        if version == alias:
            raise RouteError(f"{at}.versions: an alias cannot route to itself")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise RouteError(f"{at}.versions.{version}: the weight must be a number >= 0")
        pairs.append((version, float(weight)))
    if not any(w > 0 for _, w in pairs):
        raise RouteError(f"{at}.versions: at least one weight must be > 0")
    shadow = None
    if body.get("shadow") is not None:
        s = body["shadow"]
        if not isinstance(s, dict) or set(s) != {"version", "fraction"}:
            raise RouteError(f"{at}.shadow: must be an object with 'version' and 'fraction'")
        version, fraction = s["version"], s["fraction"]
        if not isinstance(version, str) or not version or version == alias:
            raise RouteError(f"{at}.shadow.version: must be an adapter name other than the alias")
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise RouteError(f"{at}.shadow.fraction: must be a number in [0, 1]")
        shadow = Shadow(version, float(fraction))
    return Route(alias, tuple(pairs), shadow)


@dataclass(frozen=True)
class RouteTable:
    """Every route, by alias (never mutated: with_route / without return a new table)."""

    routes: Mapping[str, Route] = field(default_factory=dict)

    def get(self, alias: str) -> Route | None:
        return self.routes.get(alias)

    def __contains__(self, alias: object) -> bool:
        return alias in self.routes

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes[a] for a in sorted(self.routes))

    def with_route(self, route: Route) -> RouteTable:
        return RouteTable({**self.routes, route.alias: route})

    def without(self, alias: str) -> RouteTable:
        return RouteTable({a: r for a, r in self.routes.items() if a != alias})

    def users_of(self, name: str) -> list[str]:
        """Aliases whose route may run adapter `name`."""
        return sorted(a for a, r in self.routes.items() if name in r.names())

    def to_json(self) -> dict[str, Any]:
        return {r.alias: r.to_json() for r in self}


def parse_routes(data: Any, where: str = "") -> RouteTable:
    """A RouteTable from the routes file's parsed content: an object keyed by alias."""
    if not isinstance(data, dict):
        raise RouteError(f"{where}the routes file must hold an object mapping each alias to its route")
    return RouteTable({alias: parse_route(alias, body, where) for alias, body in data.items()})


def read_routes_file(path: str | Path, content: bytes | None = None) -> RouteTable:
    """Parse the routes file: JSON for `.json`, YAML otherwise (YAML is a superset of JSON).
    `content`: the file's bytes already read (the watcher parses exactly what it compared)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8") if content is None else content.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RouteError(f"cannot read the routes file {path}: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise RouteError(f"the routes file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}") from exc
    if data is None:
        data = {}  # an empty file: no routes
    return parse_routes(data, f"{path}: ")
