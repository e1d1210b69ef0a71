"""Structured outputs in the engine (engine/grammar.py) on a tiny model whose lm_head is wider than its
tokenizer: token equality with transformers + PEFT constrained by xgrammar's own logits processor on a
mixed batch (three adapters and the base, constrained and free requests together); validity of sampled
JSON over 32 schemas; regex, choice and EBNF; n > 1; preemption; the compile cache and its time limit."""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest
import torch
from server_fixtures import save_tokenizer
from structured_schemas import SCHEMAS
from tiny_models import reference_greedy, save_peft_adapter, save_tiny_model

from loraplex.config import Config
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine
from loraplex.engine.grammar import GrammarCache
from loraplex.engine.runner import ModelRunner
from loraplex.errors import InvalidRequestError
from loraplex.scheduler.sampling_params import SamplingParams
from loraplex.scheduler.structured_output import StructuredOutput

EOS = 1
PAD_VOCAB = 40  # lm_head rows beyond the tokenizer's vocabulary (never allowed by a grammar)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
}
EBNF = 'root ::= item ("," item)*\nitem ::= [a-c]+ | "(" root ")"'


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    base = root / "base"
    vocab = save_tokenizer(base)
    save_tiny_model(
        base, "llama", seed=11, vocab_size=vocab + PAD_VOCAB, bos_token_id=0, eos_token_id=EOS, pad_token_id=2
    )
    targets = [["q_proj", "v_proj"], "all-linear", ["o_proj", "down_proj"]]
    adapters = {
        f"a{i}": save_peft_adapter(base, root / f"a{i}", [4, 8, 16][i], 8 + 4 * i, targets[i], i == 1, seed=70 + i)
        for i in range(3)
    }
    return base, adapters, vocab


def _engine(world, **overrides) -> Engine:
    base, adapters, _ = world
    cfg = dict(
        model=str(base),
        adapters=tuple((n, str(p)) for n, p in adapters.items()),
        dtype="float32",
        max_lora_rank=16,
        max_num_seqs=128,
        kv_cache_gib=0.2,
    )
    cfg.update(overrides)
    return Engine(Config(**cfg))


@pytest.fixture(scope="module")
def engine(world):
    return _engine(world)


def _spec(kind: str, value=None) -> StructuredOutput:
    builders = {
        "json_schema": lambda: StructuredOutput.json_schema(value, "test"),
        "json_object": lambda: StructuredOutput.json_object("test"),
        "regex": lambda: StructuredOutput.regex(value, "test"),
        "choice": lambda: StructuredOutput.choice(value, "test"),
        "grammar": lambda: StructuredOutput.grammar(value, "test"),
    }
    return builders[kind]()


def _hf_constrained(base, adapter_dir, prompt: list[int], compiled, max_new: int) -> list[int]:
    """transformers (+ PEFT) greedy, float32, masked by xgrammar's transformers logits processor."""
    import xgrammar as xgr

    constrained = compiled is not None
    processors = [xgr.contrib.hf.LogitsProcessor(compiled)] if constrained else []
    tokens, _ = reference_greedy(base, adapter_dir, prompt, max_new, processors, EOS if constrained else None)
    return tokens[:-1] if tokens and tokens[-1] == EOS else tokens


def test_mixed_batch_matches_transformers_with_xgrammar(world, engine):
    base, adapters, _ = world
    prompt = engine.encode("Name a color: red, green")
    cases = [  # (adapter, spec or None): three adapters and the base, constrained and free, one batch
        (None, _spec("json_schema", PERSON)),
        ("a0", _spec("regex", r"[a-e]{2,4}-[0-9]{2}")),
        ("a1", _spec("choice", ["red", "green", "blue", "yellow"])),
        ("a2", _spec("json_object")),
        ("a0", _spec("grammar", EBNF)),
        (None, None),
        ("a1", None),
        ("a2", None),
    ]
    max_new = 24
    params = [
        SamplingParams(max_tokens=max_new, structured=spec, ignore_eos=spec is None) for _, spec in cases
    ]
    results = engine.generate([prompt] * len(cases), [a for a, _ in cases], params)
    for (adapter, spec), result in zip(cases, results, strict=True):
        compiled = engine.grammars.compile(spec) if spec is not None else None
        reference = _hf_constrained(base, adapters.get(adapter), prompt, compiled, max_new)
        assert result.token_ids == reference, (adapter, spec and spec.kind, result.text)
        if spec is not None and result.finish_reason == "stop":
            _check_output(spec, result.text)
    assert sum(r.finish_reason == "stop" for r in results[:5]) >= 3  # the grammars did end outputs


def _check_output(spec: StructuredOutput, text: str) -> None:
    if spec.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(spec.spec), format_checker=jsonschema.FormatChecker())
    elif spec.kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif spec.kind == "regex":
        assert re.fullmatch(spec.spec, text), text
    elif spec.kind == "choice":
        assert text in spec.choices, text
    else:  # EBNF above: items of a-c, comma-separated, nested in parentheses
        while "(" in text:
            inner = re.sub(r"\(([a-c]+(,[a-c]+)*)\)", "a", text)
            assert inner != text, text
            text = inner
        assert re.fullmatch(r"[a-c]+(,[a-c]+)*", text), text


def test_sampled_json_is_valid_for_32_schemas(engine):
    """Temperature 1, three seeds per schema, every adapter and the base in one batch: every output that
    finished with "stop" validates (formats included); nearly all do finish (no free whitespace)."""
    assert len(SCHEMAS) >= 30
    cases = [(schema, seed) for schema in SCHEMAS for seed in range(3)]
    params = [
        SamplingParams(
            max_tokens=96,
            temperature=1.0,
            seed=seed,
            structured=_spec("json_schema", schema),
            repetition_penalty=1.1 if seed == 2 else 1.0,  # masks come before penalties
            top_k=50 if seed == 1 else 0,
        )
        for schema, seed in cases
    ]
    adapters = [[None, "a0", "a1", "a2"][i % 4] for i in range(len(cases))]
    results = engine.generate(["hello world"] * len(cases), adapters, params)
    stopped = 0
    for (schema, _), result in zip(cases, results, strict=True):
        if result.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(result.text), schema, format_checker=jsonschema.FormatChecker())
        else:
            assert result.finish_reason == "length", result.error
    assert stopped >= 0.8 * len(cases), f"only {stopped} of {len(cases)} finished"


@pytest.mark.parametrize(
    "kind, value",
    [
        ("regex", r"(cat|dog)s? [0-9]{1,3}( [xyz]+)?"),
        ("choice", ["positive", "negative", "neutral \"quoted\"", "multi\nline"]),
        ("grammar", EBNF),
        ("json_object", None),
    ],
)
def test_regex_choice_and_ebnf_outputs_match(engine, kind, value):
    spec = _spec(kind, value)
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=s, structured=spec) for s in range(8)]
    results = engine.generate(["the quick brown fox"] * 8, [None, "a0", "a1", "a2"] * 2, params)
    stopped = [r for r in results if r.finish_reason == "stop"]
    # free keys and strings of any JSON object run long on a random model; the others end soon
    assert len(stopped) >= (2 if kind == "json_object" else 5), [(r.finish_reason, r.text) for r in results]
    for r in stopped:
        _check_output(spec, r.text)
    if kind == "choice":  # the sampled choices are not all one (each row has its own matcher and seed)
        assert len({r.text for r in stopped}) >= 2


def test_each_sequence_has_its_own_matcher(engine):
    """The same spec in many rows at once (as n > 1 submits): each row advances its own state."""
    spec = _spec("json_schema", PERSON)
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=100 + i, structured=spec) for i in range(6)]
    results = engine.generate(["hello"] * 6, None, params)
    texts = [r.text for r in results if r.finish_reason == "stop"]
    assert len(texts) >= 5 and len(set(texts)) >= 4, texts
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_preemption_keeps_matchers_consistent(world):
    """A KV pool too small for the batch preempts and recomputes: the constrained greedy outputs equal
    those of a pool that never preempts."""
    spec_cycle = [_spec("json_schema", PERSON), _spec("regex", r"[a-z ]{10,40}\."), _spec("json_object"), None]
    prompts = [list(range(3 + i, 40 + 2 * i)) for i in range(12)]
    params = [
        SamplingParams(max_tokens=40, structured=spec_cycle[i % 4], ignore_eos=spec_cycle[i % 4] is None)
        for i in range(12)
    ]
    adapters = [[None, "a0", "a1", "a2"][i % 4] for i in range(12)]
    roomy = _engine(world).generate(prompts, adapters, params)
    base, _, _ = world
    from loraplex.engine.loader import load_hf_config
    from loraplex.engine.model import ModelSpec

    spec = ModelSpec.from_hf_config(load_hf_config(base))
    tight_gib = 12 * ModelRunner.kv_bytes_per_block(spec, 16, torch.float32) / 2**30
    tight = _engine(world, kv_cache_gib=tight_gib)
    requests = [tight.add_request(p, a, s) for p, a, s in zip(prompts, adapters, params, strict=True)]
    while tight.has_work():
        tight.step()
    assert sum(r.num_preemptions for r in requests) > 0
    for r, ref in zip(requests, roomy, strict=True):
        assert r.output_token_ids == ref.token_ids and r.finish_reason == ref.finish_reason


def test_unconstrained_rows_are_untouched():
    logits = torch.randn(3, 100)
    before = logits.clone()
    GrammarCache(lambda: None, 100, []).apply_masks(logits, [None, None, None])
    assert torch.equal(logits, before)


def test_compile_cache_is_lru_and_keyed_by_canonical_schema(world):
    engine = _engine(world, structured_output_cache_size=2)
    cache = engine.grammars
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}, "required": ["x"]}
    reordered = json.loads('{"required": ["x"], "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}, "type": "object"}')
    swapped = {"type": "object", "properties": {"y": {"type": "string"}, "x": {"type": "integer"}}, "required": ["x"]}
    first = cache.compile(_spec("json_schema", a))
    assert cache.compile(_spec("json_schema", reordered)) is first  # same schema, other key order: a hit
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)
    cache.compile(_spec("json_schema", swapped))  # property order is meaningful (output order): a miss
    cache.compile(_spec("regex", "a+"))  # evicts `a`, the least recently used
    assert len(cache) == 2 and cache.stats.misses == 3
    assert cache.compile(_spec("json_schema", a)) is not first
    assert cache.stats.misses == 4 and cache.stats.compile_count == 4
    assert cache.stats.compile_buckets[-1] == 4 and cache.stats.compile_sum > 0


@pytest.mark.parametrize(
    "kind, value, words",
    [
        ("json_schema", {"type": "intger"}, "intger"),
        ("json_schema", {"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
        ("json_schema", {"$ref": "#/$defs/missing"}, "$defs"),
        ("regex", "([a-", "Unclosed"),
        ("grammar", "root ::= foo", "foo"),
    ],
)
def test_compile_errors_name_the_param(engine, kind, value, words):
    spec = StructuredOutput.json_schema(value, "response_format.json_schema.schema") if kind == "json_schema" else (
        _spec(kind, value)
    )
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("hello", None, SamplingParams(structured=spec))
    assert info.value.param == spec.param and words in info.value.message
    assert not engine.has_work()  # nothing was queued


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"type": "array", "contains": {"const": 1}}}}, "#/properties/a"),
        ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "conditional"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"$ref": "https://example.com/schema.json"}, "only references inside"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
        ("not a schema", "must be a JSON schema object"),
    ],
)
def test_unsupported_keywords_are_refused_up_front(schema, words):
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutput.json_schema(schema, "response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema" and words in info.value.message


def test_empty_choice_and_regex_are_refused():
    for build in (lambda: StructuredOutput.choice([], "guided_choice"), lambda: StructuredOutput.regex("", "guided_choice")):
        with pytest.raises(InvalidRequestError) as info:
            build()
        assert info.value.param == "guided_choice"


def test_compile_over_the_time_limit_fails_only_its_request(world):
    """With a limit no compile can meet, a new schema fails fast with its own error while a free request
    is served; the compile finishes in the background, so the same schema then runs from the cache."""
    engine = AsyncEngine(_engine(world, structured_output_compile_timeout=1e-6))
    grammars = engine.engine.grammars
    real_compile = grammars._compile_uncached

    def slow_compile(spec):  # the real compile, after a pause: a fast one could finish before the wait starts
        time.sleep(0.3)
        return real_compile(spec)

    grammars._compile_uncached = slow_compile
    engine.start()
    schema = {"type": "object", "properties": {"slow": {"type": "integer"}}, "required": ["slow"]}
    spec = StructuredOutput.json_schema(schema, "response_format.json_schema.schema")

    async def run() -> list:
        with pytest.raises(InvalidRequestError) as info:
            await engine.submit("hello", None, SamplingParams(max_tokens=8, structured=spec))
        assert info.value.code == "structured_output_timeout" and info.value.param == spec.param
        free = [out async for out in await engine.submit("hello", "a0", SamplingParams(max_tokens=5, ignore_eos=True))]
        assert free[-1].finished and free[-1].num_output_tokens == 5
        for _ in range(200):  # the compile goes on in its thread and lands in the cache
            if engine.engine.grammars.stats.compile_count:
                break
            await asyncio.sleep(0.05)
        return [out async for out in await engine.submit("hello", None, SamplingParams(max_tokens=16, structured=spec))]

    try:
        outs = asyncio.run(run())
    finally:
        engine.stop()
    assert outs[-1].finished and outs[-1].finish_reason in ("stop", "length")
    assert engine.engine.grammars.stats.hits >= 1
