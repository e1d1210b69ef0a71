"""Turn a stream of token ids into a stream of text deltas, and stop strings that are never streamed.

Why not decode each token alone: a byte-level BPE token can hold part of a UTF-8 character (an emoji
is often 2-3 tokens; alone they decode to U+FFFD), and a SentencePiece token "▁world" decodes alone to
"world" because a decoder strips the leading space of the first token of what it decodes.

Technique (two offsets into the token list): `prefix` marks where the decode window starts, `read`
marks the end of what has already been returned. Each new token we decode `ids[prefix:]` and compare
it with the (cached) decode of `ids[prefix:read]`; the extra characters are the delta. Starting the
window a chunk earlier gives every token its left context, so leading spaces come out right. When
the window text ends in U+FFFD the last character is still incomplete, and nothing is returned until
a later token completes it. After a delta the window moves on: prefix <- read, read <- end.

Because a window only ever starts where an earlier window ended on a complete character, the deltas
join to exactly `tokenizer.decode(output_ids)` for context-free decoders (byte-level BPE: GPT-2,
Llama 3, Qwen, SmolLM2). The first window starts inside the prompt (its last few tokens), so for
SentencePiece tokenizers that strip the first leading space, the first output token keeps its space
(" world" after "Hello"), as an OpenAI completion shows it, where decode(output_ids) would drop it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

REPLACEMENT_CHAR = "\ufffd"
# Tokens of prompt context for the first window: enough for any decoder's leading-space rule.
NUM_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """`add(token_id)` returns the newly completed text; `flush()` returns what is still held back.

    `tokenizer` is anything with `decode(ids, skip_special_tokens=...)` (a transformers tokenizer or a
    `tokenizers.Tokenizer`). The EOS token is normally not added (the engine drops it).
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: its bytes would merge with the output's and shift
            # every offset, so decode the output on its own instead.
            context, context_text = [], ""
        self._ids = context  # [context tokens..., output tokens...]
        self._prefix = 0
        self._read = len(context)
        self._prefix_text = context_text  # decode(ids[prefix:read]), cached
        self.text = ""  # all text returned so far (by add and flush)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(window)

    def flush(self) -> str:
        """Return everything still held back (an incomplete character stays U+FFFD, as decode shows it)."""
        if self._read == len(self._ids):
            return ""
        window = self._decode(self._ids[self._prefix :])
        return self._advance(window)

    def _advance(self, window: str) -> str:
        delta = window[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` where the output must be cut: the start of the stop-string occurrence (beginning
    at or after `start`) that ends first; among those ending at the same place, the longest.

    "Ends first" is what a character-by-character stream would see first, so the cut does not depend
    on how the text was split into deltas. None when no stop string occurs.
    """
    best: tuple[int, int] | None = None  # (end, start) of the best occurrence
    for stop in stops:
        i = text.find(stop, start)
        if i >= 0 and (best is None or (i + len(stop), i) < best):
            best = (i + len(stop), i)
    return None if best is None else best[1]


class StopCheck(NamedTuple):
    emit: str  # text safe to stream now
    stopped: bool  # a stop string was found: the request is finished
    text: str  # all text emitted so far; once stopped, the final text (ends just before the stop)


class StopMatcher:
    """Feed detokenizer deltas; stream only text that can never become part of a stop string.

    Holding back: a stop string may arrive split over several deltas ("<|" then "end|>"), so the tail of
    the text that could still be the start of a stop string is held, never streamed. The simple rule is
    to hold the last max(len(stop)) - 1 characters; this class holds only the longest tail that is a
    proper prefix of some stop string (at most that many characters, often none), so ordinary text
    streams without delay. Correctness: a later occurrence that began in already-emitted text would
    make a longer tail a stop prefix, contradicting the choice of the held tail.

    At the end of a request that finished otherwise (EOS, max_tokens), call `flush()` for the held tail.
    Without stop strings every delta passes straight through.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # emitted so far
        self._held = ""  # received, not yet emitted
        self.stopped = False

    def add(self, delta: str) -> StopCheck:
        if self.stopped or not delta:
            return StopCheck("", self.stopped, self.text)
        pending = self._held + delta
        cut = find_stop(pending, self.stops)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return self._emit(pending[:cut])
        keep = self._stop_prefix_len(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def flush(self) -> StopCheck:
        """The request ended without a stop string: release the held tail."""
        held, self._held = self._held, ""
        return self._emit(held)

    def _emit(self, emit: str) -> StopCheck:
        self.text += emit
        return StopCheck(emit, self.stopped, self.text)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
