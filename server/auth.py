"""API keys: who may call the server, which models each key may use, and who is admin.

Off unless keys are configured. `--api-key KEY` adds an admin key (every model, load/unload). The
keys file (`--api-keys-file`) is JSON, an object mapping each key to its policy:

    {
      "sk-tenant-a": {"adapters": ["tenant-a-*", "shared-summarizer"]},
      "sk-tenant-b": {"adapters": ["tenant-b-*"], "admin": false},
      "sk-ops":      {"adapters": ["*"], "admin": true}
    }

`adapters` holds model names or fnmatch globs (`*`, `?`, `[...]`); the base model is matched by its
served name like any adapter (list it, or a glob matching it, to allow base-model requests). An
admin key may use every model. A key missing from the table is refused with 401; a key that may not
use a model gets the same 404 as an unknown model. Keys are compared in constant time
(hmac.compare_digest over SHA-256 digests, every configured key checked on each request).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .errors import AuthenticationError, PermissionDeniedError


@dataclass(frozen=True)
class KeyPolicy:
    adapters: tuple[str, ...] = ()  # names or fnmatch globs
    admin: bool = False

    def may_use(self, model: str) -> bool:
        return self.admin or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.adapters)


ADMIN = KeyPolicy(("*",), admin=True)
OPEN = KeyPolicy(("*",), admin=True)  # what every caller is when auth is off


def parse_keys_file(path: str | Path) -> dict[str, KeyPolicy]:
    """Read the JSON keys file; ConfigError naming the key position and field on any mistake."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the API keys file {path}: {exc}", param="api_keys_file") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: must be a JSON object mapping each key to a policy", param="api_keys_file"
        )
    keys = {}
    for i, (key, policy) in enumerate(data.items()):
        where = f"{path}: entry {i + 1}"
        if not key.strip() or key != key.strip():
            raise ConfigError(
                f"{where}: the key must be non-empty, without surrounding spaces", param="api_keys_file"
            )
        if not isinstance(policy, dict) or set(policy) - {"adapters", "admin"}:
            raise ConfigError(
                f"{where}: the policy must be an object with 'adapters' and 'admin'", param="api_keys_file"
            )
        adapters = policy.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            raise ConfigError(f"{where}: 'adapters' must be a list of names or globs", param="api_keys_file")
        admin = policy.get("admin", False)
        if not isinstance(admin, bool):
            raise ConfigError(f"{where}: 'admin' must be true or false", param="api_keys_file")
        keys[key] = KeyPolicy(tuple(adapters), admin)
    return keys


def build_key_table(
    api_key: str | None = None, api_keys_file: str | None = None
) -> dict[str, KeyPolicy] | None:
    """The keys from the CLI flags (None when auth is off)."""
    keys: dict[str, KeyPolicy] = {}
    if api_keys_file:
        keys.update(parse_keys_file(api_keys_file))
    if api_key:
        keys[api_key] = ADMIN
    return keys or None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    def __init__(self, keys: Mapping[str, KeyPolicy] | None) -> None:
        self._table = [(_digest(k), p) for k, p in (keys or {}).items()]

    @property
    def enabled(self) -> bool:
        return bool(self._table)

    def check(self, authorization: str | None) -> KeyPolicy:
        """The policy of the bearer key in an Authorization header value; 401 when missing or unknown."""
        if not self._table:
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
        digest = _digest(token)
        found = None
        for stored, policy in self._table:  # no early exit: the time does not depend on which key
            if hmac.compare_digest(stored, digest):
                found = policy
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found

    def check_admin(self, authorization: str | None) -> KeyPolicy:
        policy = self.check(authorization)
        if not policy.admin:
            raise PermissionDeniedError("This action needs an admin API key.")
        return policy
