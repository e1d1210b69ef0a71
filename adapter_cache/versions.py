"""AdapterVersions: which version of each adapter name new requests get, and when an old one may go.

An in-place update (`POST /v1/load_lora_adapter` with a served name and a new path) loads the new
weights under a version key of their own, `NAME#2`, `NAME#3`, ... (`#` is never part of an adapter
name, so keys cannot clash with names). The first version of a name is keyed by the name itself, so
adapters that are never updated look exactly as before. The adapter cache, the scheduler and the
prefix cache all work on version keys: two versions of one name are simply two adapters.

    acquire(name) -> key    a request starts: it runs on the current version until it ends
    release(key) -> bool    it ended; True when `key` was retired and this was its last request
                            (the caller then frees its slot and host copy)
    switch(name, key)       the update validated: new requests get `key`; the old version retires
                            now if idle, else when its last request ends (release answers True)

Pure bookkeeping under one lock (no torch, nothing slow): acquire and switch are atomic with respect
to each other, so no request can start on a version after it retired.
"""

from __future__ import annotations

import threading
from collections import Counter

SEPARATOR = "#"


def public_name(key: str) -> str:
    """The adapter name a version key belongs to (`legal#3` -> `legal`)."""
    return key.split(SEPARATOR, 1)[0]


class AdapterVersions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, str] = {}  # name -> key, only for names updated at least once
        self._revision: Counter[str] = Counter()  # name -> the last revision number handed out
        self._live: Counter[str] = Counter()  # key -> requests running or waiting on it
        self._retired: set[str] = set()  # keys replaced by a newer version, still in use

    def current(self, name: str) -> str:
        """The version key new requests for `name` get."""
        with self._lock:
            return self._current.get(name, name)

    def acquire(self, name: str) -> str:
        with self._lock:
            key = self._current.get(name, name)
            self._live[key] += 1
            return key

    def release(self, key: str) -> bool:
        with self._lock:
            self._live[key] -= 1
            if self._live[key] > 0:
                return False
            del self._live[key]
            if key in self._retired:
                self._retired.discard(key)
                return True
            return False

    def new_key(self, name: str) -> str:
        """A fresh key for the next version of `name` (not current until switch)."""
        with self._lock:
            self._revision[name] = max(self._revision[name], 1) + 1
            return f"{name}{SEPARATOR}{self._revision[name]}"

    def switch(self, name: str, key: str) -> str | None:
        """Make `key` current for `name`. Returns the old key when it can be freed now (no request uses
        it); else it is freed when release() says so."""
        with self._lock:
            old = self._current.get(name, name)
            self._current[name] = key
            if old == key:
                return None
            if self._live[old] > 0:
                self._retired.add(old)
                return None
            self._live.pop(old, None)
            return old

    def in_use(self, key: str) -> int:
        with self._lock:
            return self._live.get(key, 0)

    def retired_of(self, name: str) -> list[str]:
        """Old versions of `name` still finishing requests."""
        with self._lock:
            return sorted(k for k in self._retired if public_name(k) == name)

    def forget(self, name: str) -> list[str]:
        """`name` is unloaded: its next load starts over at the name itself. Returns the version keys
        other than the name that can be freed now; retired ones still in use are freed by release()."""
        with self._lock:
            current = self._current.pop(name, name)
            idle = {k for k in self._retired if public_name(k) == name and not self._live[k]}
            self._retired -= idle
            return sorted(k for k in idle | {current} if k != name)
