"""Structured outputs in the engine: every constrained output is valid at temperature 1 over many
seeds, with preemption, n > 1 and unconstrained neighbours; the bitmask matches llguidance's own."""

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from test_engine import ENGINE_KWARGS, assert_pool_free, count_compiles, sharpened

from jpaged import LLM, SamplingParams, StructuredOutputsParams
from jpaged.sampler import apply_token_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "eel"]},
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["id", "kind", "name", "ok"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}(\.[A-Z])?"
CHOICES = ["yes", "no", "not sure"]
LARK = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
GBNF = 'root ::= "<" [a-c]+ ">" | "[" [0-9] "]"'


def _valid(kind: str, text: str) -> bool:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    if kind == "json_object":
        return isinstance(json.loads(text), dict)
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    if kind == "lark":
        return re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text) is not None
    return re.fullmatch(r"<[a-c]+>|\[[0-9]\]", text) is not None


CONSTRAINTS = {
    "json": StructuredOutputsParams(json=SCHEMA),
    "json_object": StructuredOutputsParams(json_object=True),
    "regex": StructuredOutputsParams(regex=REGEX),
    "choice": StructuredOutputsParams(choice=CHOICES),
    "lark": StructuredOutputsParams(grammar=LARK),
    "gbnf": StructuredOutputsParams(grammar=GBNF),
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), **ENGINE_KWARGS)
    llm.update_weights(sharpened(llm.llm_engine.runner.params, 3.0))
    yield llm
    assert_pool_free(llm)


def _prompts(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(100, 40000, size=int(rng.integers(2, 30))).tolist()}
            for _ in range(count)]


@pytest.mark.parametrize("kind", [k for k in CONSTRAINTS if k != "json_object"])
def test_constrained_outputs_are_valid_over_seeds(llm, kind):
    """Temperature 1, 16 seeds, n=2, a pool small enough to preempt: every output is valid."""
    prompts = _prompts(8, seed=len(kind))
    params = [SamplingParams(temperature=1.0, seed=100 + i, n=2, max_tokens=96,
                             structured_outputs=CONSTRAINTS[kind]) for i in range(len(prompts))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    texts = [c.text for o in outputs for c in o.outputs]
    for o in outputs:
        for c in o.outputs:
            assert c.finish_reason == "stop", (kind, c.text)
            assert _valid(kind, c.text), (kind, c.text)
    assert len(set(texts)) > 2, texts  # sampling really varied
    assert_pool_free(llm)


def test_json_object_tokens_all_follow_the_grammar(llm):
    """Any JSON object is unbounded, so a random model rarely closes one: every output must still be
    a prefix the grammar accepts, and the finished ones must parse."""
    constraint = CONSTRAINTS["json_object"]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=constraint) for i in range(8)]
    outputs = llm.generate(_prompts(8, seed=5), params, use_tqdm=False)
    for o in outputs:
        c = o.outputs[0]
        matcher = llm.llm_engine.structured_output.new_matcher(constraint)
        assert all(matcher.consume_token(t) for t in c.token_ids), c.text
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert _valid("json_object", c.text)


@pytest.mark.parametrize("swap_space", [0.0, 0.001])
def test_preemption_and_unconstrained_neighbours(tiny_model_dir, llm, swap_space):
    """Constrained requests (seeded) share batches with greedy unconstrained ones and the pool
    forces preemption (recompute, or swap to host): the greedy outputs equal those of the greedy
    requests run alone, the seeded constrained outputs equal those run alone, and all
    constrained outputs are valid."""
    if swap_space:
        llm = LLM(str(tiny_model_dir), **{**ENGINE_KWARGS, "swap_space": swap_space})
        llm.update_weights(sharpened(llm.llm_engine.runner.params, 3.0))
        assert llm.llm_engine.runner.num_swap_blocks > 0
    engine = llm.llm_engine
    greedy_prompts = _prompts(4, seed=7)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(greedy_prompts, greedy, use_tqdm=False)]
    json_prompts = _prompts(6, seed=8)
    json_params = [SamplingParams(temperature=1.0, seed=i, max_tokens=90, structured_outputs=CONSTRAINTS["json"])
                   for i in range(len(json_prompts))]
    json_alone = [llm.generate(p, q, use_tqdm=False)[0].outputs[0].text for p, q in zip(json_prompts, json_params)]
    before = engine.get_stats().num_preemptions
    mixed = llm.generate(greedy_prompts + json_prompts, [greedy] * 4 + json_params, use_tqdm=False)
    assert engine.get_stats().num_preemptions > before, "the workload must force preemption"
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    texts = [o.outputs[0].text for o in mixed[4:]]
    assert texts == json_alone
    assert all(_valid("json", t) for t in texts)
    assert_pool_free(llm)


def test_no_compiles_after_warmup_with_constrained_rows(llm):
    rng = np.random.default_rng(3)
    prompts = _prompts(10, seed=9)
    params = []
    for i in range(len(prompts)):
        constraint = list(CONSTRAINTS.values())[i % len(CONSTRAINTS)] if i % 3 else None
        params.append(SamplingParams(temperature=float(rng.choice([0.0, 1.0])), top_k=int(rng.choice([0, 5])),
                                     n=int(rng.integers(1, 3)), max_tokens=48, structured_outputs=constraint,
                                     logprobs=2 if i % 4 == 0 else None))
    llm.generate(prompts[:1], params[1], use_tqdm=False)  # builds llguidance's tokenizer (no XLA compile)
    with count_compiles() as compiles:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.finished for o in outputs)
    assert compiles == []


def test_grammar_compiled_once_per_constraint(llm):
    manager = llm.llm_engine.structured_output
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9, "minimum": 0}},
              "required": ["n"], "additionalProperties": False}
    before = manager.compiler.num_compiles
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=20,
                                structured_outputs=StructuredOutputsParams(json=dict(schema)))
        output = llm.generate(_prompts(1, seed)[0], params, use_tqdm=False)[0]
        assert all(json.loads(c.text)["n"] in range(10) for c in output.outputs)
    assert manager.compiler.num_compiles == before + 1


def test_stop_string_and_abort_free_the_request(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=60, stop=['"kind"'],
                            structured_outputs=CONSTRAINTS["json"])
    output = llm.generate(_prompts(1, 11)[0], params, use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "stop" and output.stop_reason == '"kind"'
    assert output.text.startswith('{"id": ')
    engine.add_request("to-abort", _prompts(1, 12)[0],
                       SamplingParams(max_tokens=50, structured_outputs=CONSTRAINTS["json"]))
    engine.step()
    final = engine.abort_request("to-abort")
    assert final.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert_pool_free(llm)


@pytest.mark.parametrize("constraint, message", [
    (dict(json={"type": "objekt"}), "Invalid JSON schema for structured outputs: Invalid type: objekt"),
    (dict(json="{not json"), "Invalid JSON schema for structured outputs: not valid JSON"),
    (dict(regex="a(b"), "Invalid regex for structured outputs"),
    (dict(grammar="start: foo"), 'unknown name: "foo"'),
])
def test_invalid_constraints_raise_before_queueing(llm, constraint, message):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("bad", [5, 6, 7], SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)))
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_unfinished_requests()


def test_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one constraint .* got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got json, regex"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="choice must be a non-empty list of strings"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_bitmask_apply_matches_llguidance_numpy():
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(0)
    vocab = 1000  # not a multiple of 32
    logits = rng.normal(size=(5, vocab)).astype(np.float32)
    bitmask = rng.integers(-2**31, 2**31, size=(5, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
    bitmask[2] = -1  # an unconstrained row
    want = logits.copy()
    apply_token_bitmask_inplace(want, bitmask)
    got = np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[2], logits[2])


def test_json_output_writes_properties_in_the_schemas_order(llm):
    """The grammar keeps the schema's property order (vLLM's too), whatever the alphabet says."""
    properties = {"zeta": {"type": "integer"}, "alpha": {"type": "boolean"}, "mid": {"enum": ["x", "y"]}}
    schema = {"type": "object", "properties": properties, "required": list(properties),
              "additionalProperties": False}
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=40,
                             structured_outputs=StructuredOutputsParams(json=schema)) for seed in range(4)]
    outputs = llm.generate(_prompts(4, seed=7), params, use_tqdm=False)
    for output in outputs:
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        assert list(json.loads(output.outputs[0].text)) == ["zeta", "alpha", "mid"]


def test_objects_with_listed_properties_allow_no_other_keys(llm):
    """vLLM's default (xgrammar's strict mode): an object that lists its properties takes no other
    keys unless the schema says additionalProperties; a bare {"type": "object"} stays open."""
    compiler = llm.llm_engine.structured_output.compiler
    tokenizer = llm.get_tokenizer()

    def accepts(schema, text: str) -> bool:
        matcher = compiler.new_matcher(StructuredOutputsParams(json=schema))
        tokens = tokenizer.encode(text, add_special_tokens=False)
        return matcher.validate_tokens(tokens) == len(tokens)

    listed = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert accepts(listed, '{"a": 1}') and not accepts(listed, '{"a": 1, "b": 2}')
    assert accepts({**listed, "additionalProperties": True}, '{"a": 1, "b": 2}')
    nested = {"type": "object", "properties": {"inner": listed}, "required": ["inner"], "additionalProperties": True}
    assert accepts(nested, '{"inner": {"a": 1}, "x": 0}') and not accepts(nested, '{"inner": {"a": 1, "b": 2}}')
    assert accepts({"type": "object"}, '{"anything": [1]}')
    both = {"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "integer"}}}]}
    assert accepts(both, '{"a": 1, "b": 2}')


@pytest.mark.parametrize("n", [1, 2])
def test_a_constraint_after_its_marker_leaves_the_output_before_it_free(llm, n):
    """after_token_ids (a reasoning model's </think>): the output matches the unconstrained one up
    to and including the first occurrence of the marker, then follows the grammar; a reply that
    never writes the marker is never constrained."""
    rng = np.random.default_rng(11)
    prompt = {"prompt_token_ids": rng.integers(100, 40000, size=15).tolist()}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    marker = free[3:5]
    end = next(i + 2 for i in range(len(free)) if free[i:i + 2] == marker)
    constraint = StructuredOutputsParams(choice=CHOICES, after_token_ids=marker)
    output = llm.generate(prompt, SamplingParams(n=n, temperature=0, max_tokens=30, structured_outputs=constraint),
                          use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    for sample in output.outputs:
        assert sample.token_ids[:end] == free[:end]
        assert tokenizer.decode(sample.token_ids[end:]) in CHOICES and sample.finish_reason == "stop"
    unmarked = StructuredOutputsParams(choice=CHOICES, after_token_ids=[7, 7, 7])
    never = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                structured_outputs=unmarked), use_tqdm=False)[0].outputs[0]
    assert never.token_ids == free
    with pytest.raises(ValueError, match="after_token_ids"):
        StructuredOutputsParams(regex="a", after_token_ids=[])
