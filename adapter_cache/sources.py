"""Where adapters come from: named sources, an adapter directory, and (opt-in) the Hugging Face Hub.

An adapter name arrives in a request (the OpenAI `model` field), so it is untrusted. It is matched
against a strict pattern before it is joined to any path, and the joined path is checked again after
symlinks are resolved: a name such as `../x`, `/etc`, `a/../../b` or a symlink pointing out of the
adapter directory never makes us read a file outside the configured roots.

Resolution order for a name:
1. `named` (from `--adapter NAME=SOURCE`): SOURCE is a local directory, or a Hub id when allow_hub.
   These are configured by the operator and trusted as given.
2. `adapter_dir / name` when the name is one plain path component (discovered at request time, so a
   folder dropped in later needs no restart).
3. A Hub id `org/name` or `org/name@revision`, only when allow_hub; huggingface_hub's cache honours
   HF_HUB_OFFLINE, HF_HUB_CACHE and HF_TOKEN by itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import AdapterError, AdapterNotFoundError
from .peft_format import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE

MAX_NAME_LENGTH = 128
# One path component: no separators, no leading dot (so never `.` or `..`), no NUL, no drive letters.
_LOCAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
# org/name[@revision]; a revision may be a branch with slashes (refs/pr/1) or a commit hash.
_HUB_ID = re.compile(
    rf"(?P<repo>{_HUB_PART}/{_HUB_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{{0,127}}))?"
)
# What a PEFT adapter repo needs. *.bin is fetched too, so that a pickle-only adapter gets
# load_peft_adapter's clear "safetensors only" error instead of a vague "missing file".
HUB_ALLOW_PATTERNS = [CONFIG_FILE, "*.safetensors", "*.bin"]

Downloader = Callable[..., str]


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """`org/name[@revision]` -> (repo_id, revision or None); None when `text` is not a valid Hub id."""
    m = _HUB_ID.fullmatch(text)
    if m is None or ".." in text:
        return None
    return m.group("repo"), m.group("revision")


def is_local_name(text: str) -> bool:
    """Whether `text` can name a subfolder of the adapter directory (one safe path component)."""
    return _LOCAL_NAME.fullmatch(text) is not None and ".." not in text


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


class AdapterSources:
    """Maps adapter names to local directories. Thread-safe (no mutable state besides the file system)."""

    def __init__(
        self,
        named: dict[str, str] | None = None,
        adapter_dir: Path | str | None = None,
        allow_hub: bool = False,
        *,
        download: Downloader | None = None,
    ) -> None:
        self.named = dict(named or {})
        self.adapter_dir = Path(adapter_dir).expanduser() if adapter_dir is not None else None
        self.allow_hub = allow_hub
        self._download = download  # tests may inject one; default: huggingface_hub.snapshot_download

    # ---- cheap checks -----------------------------------------------------------------------------
    def known(self, name: str) -> bool:
        """Whether `name` could resolve, without reading anything but directory metadata (for request
        admission). A Hub id counts as known when allow_hub: only a download can tell more."""
        if name in self.named:
            return True
        if self._local_candidate(name) is not None:
            return True
        return self.allow_hub and parse_hub_id(name) is not None

    def local_names(self) -> list[str]:
        """Named adapters plus the adapter directory's current subfolders (for listing)."""
        names = set(self.named)
        if self.adapter_dir is not None and self.adapter_dir.is_dir():
            for child in self.adapter_dir.iterdir():
                if is_local_name(child.name) and self._local_candidate(child.name) is not None:
                    names.add(child.name)
        return sorted(names)

    # ---- resolution -------------------------------------------------------------------------------
    def resolve(self, name: str) -> Path:
        """The local directory holding adapter `name`, downloading it from the Hub if needed (this may
        block: call it from a loader thread). Raises AdapterNotFoundError, or AdapterError on a failed
        download."""
        if name in self.named:
            return self._resolve_named(name, self.named[name])
        if not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
            raise AdapterNotFoundError(name[:MAX_NAME_LENGTH], "invalid adapter name")
        if is_local_name(name):
            path = self._local_candidate(name, strict=True)
            if path is not None:
                return path
            if self.adapter_dir is None:
                raise AdapterNotFoundError(
                    name, f"unknown adapter; configured adapters: {sorted(self.named)}"
                )
            raise AdapterNotFoundError(
                name, f"unknown adapter: no folder of that name in the adapter directory {self.adapter_dir}"
            )
        hub = parse_hub_id(name)
        if hub is not None:
            if not self.allow_hub:
                raise AdapterNotFoundError(
                    name,
                    "looks like a Hugging Face Hub id, but Hub sources are disabled (start with --allow-hub)",
                )
            return self._download_hub(name, *hub)
        raise AdapterNotFoundError(
            name,
            "invalid adapter name: use a configured name, a folder name of the adapter directory "
            "(letters, digits, '.', '_', '-'), or a Hub id org/name[@revision]",
        )

    def _resolve_named(self, name: str, source: str) -> Path:
        path = Path(source).expanduser()
        if path.is_dir():
            return path.resolve()
        hub = parse_hub_id(source)
        if hub is not None and not path.exists():
            if not self.allow_hub:
                raise AdapterNotFoundError(
                    name,
                    f"source {source!r} is not a local directory and Hub sources are disabled (start with --allow-hub)",
                )
            return self._download_hub(name, *hub)
        raise AdapterNotFoundError(name, f"source {source!r} is not a directory")

    def _local_candidate(self, name: str, strict: bool = False) -> Path | None:
        """adapter_dir / name when it is a directory inside the adapter directory, else None. With
        strict, a folder that exists but escapes the root (a symlink out of it, or files inside it that
        link out) raises instead of answering None."""
        if self.adapter_dir is None or not is_local_name(name):
            return None
        try:
            root = self.adapter_dir.resolve()
            link = root / name
            if not link.is_dir():
                return None
            path = link.resolve()
            escaped = not _inside(path, root) or path == root
            if not escaped:
                # The files load_peft_adapter opens must not link out of the root either.
                for f in (CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE):
                    if (path / f).is_symlink() and not _inside((path / f).resolve(), root):
                        escaped = True
        except (OSError, RuntimeError, ValueError):  # symlink loops, odd file systems
            return None
        if escaped:
            if strict:
                raise AdapterNotFoundError(
                    name, f"refused: the folder links outside the adapter directory {self.adapter_dir}"
                )
            return None
        return path

    def _download_hub(self, name: str, repo_id: str, revision: str | None) -> Path:
        """snapshot_download into huggingface_hub's cache (a no-op when cached; offline-safe)."""
        from huggingface_hub import errors as hf_errors

        download = self._download
        if download is None:
            from huggingface_hub import snapshot_download

            download = snapshot_download
        where = f"{repo_id}@{revision}" if revision else repo_id
        try:
            folder = download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
        except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as exc:
            raise AdapterNotFoundError(
                name, f"Hub repository {where} not found, or gated/private without a valid HF_TOKEN ({exc})"
            ) from exc
        except hf_errors.LocalEntryNotFoundError as exc:
            raise AdapterNotFoundError(
                name,
                f"Hub repository {where} is not in the local Hugging Face cache and the Hub cannot be "
                f"reached (HF_HUB_OFFLINE set, or no network): {exc}",
            ) from exc
        except hf_errors.HFValidationError as exc:
            raise AdapterNotFoundError(name, f"invalid Hub id {where}: {exc}") from exc
        except (OSError, ValueError) as exc:  # HTTP errors are OSErrors in huggingface_hub
            raise AdapterError(
                name, f"download of {where} from the Hub failed: {exc}", code="adapter_download_failed"
            ) from exc
        return Path(folder)
