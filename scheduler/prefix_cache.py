"""Content addresses of full KV blocks (pure Python), for automatic prefix caching.

A block's K/V depend on every token before it and on the weights that computed them: a LoRA adapter on
any layer changes the K/V of every later layer. So a full block's key is a strong hash of its parent
block's key (which covers all earlier tokens), its own token ids, and the *namespace*: the base model,
or an adapter's name plus a digest of its weights (a reloaded or changed adapter gets a new namespace).
Only blocks whose K/V a completed step computed are ever keyed (the scheduler publishes them in
postprocess), so partial blocks and aborted prefills never serve anyone.
"""

from __future__ import annotations

import hashlib
import struct

KEY_BYTES = 32  # blake2b-256: an accidental collision is out of the question


def block_key(parent: bytes | None, token_ids: list[int], namespace: str) -> bytes:
    """Key of one full block. The encoding is canonical: lengths prefix every variable part, so no two
    different (parent, tokens, namespace) triples share a byte string."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"loraplex-kv")
    ns = namespace.encode()
    h.update(struct.pack("<Q", len(ns)))
    h.update(ns)
    h.update(parent if parent is not None else b"\x00" * KEY_BYTES)
    h.update(struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    return h.digest()


def extend_keys(keys: list[bytes], token_ids: list[int], num_full: int, block_size: int, namespace: str) -> None:
    """Append to `keys` (the keys of the first len(keys) blocks of `token_ids`) up to `num_full` blocks."""
    for i in range(len(keys), num_full):
        parent = keys[i - 1] if i else None
        keys.append(block_key(parent, token_ids[i * block_size : (i + 1) * block_size], namespace))


def base_namespace(model_name: str) -> str:
    return f"base\x00{model_name}"


def adapter_namespace(name: str, weights_digest: str) -> str:
    return f"adapter\x00{name}\x00{weights_digest}"
