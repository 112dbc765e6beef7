"""GrammarCompiler: turns StructuredOutputsParams into llguidance matchers, compiling each once.

llguidance (a Rust library with no torch dependency) was picked over xgrammar for its compile
time and its dependencies; docs/structured_output.md has the measurements. A compiled grammar is
kept as a pristine `LLMatcher` in an LRU cache keyed by the constraint's text; every request gets
a `deep_copy()` of it, which is cheap. `compile` is thread-safe and drops the GIL while llguidance
builds the grammar, so servers call it off the engine thread (AsyncLLM does).
"""

import collections
import json
import threading

import llguidance
import llguidance.hf

from jpaged.structured_output.params import StructuredOutputsParams

# Distinct constraints kept compiled.
CACHE_SIZE = 256
# JSON is emitted the way json.dumps writes it (", " and ": "), with no other whitespace: a free
# whitespace rule lets small models emit newlines until max_tokens runs out.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_LABELS = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
           "json_object": "JSON object"}


class GrammarCompiler:
    """Compiles constraints for one tokenizer.

    Args:
      hf_tokenizer: a transformers fast tokenizer. vocab_size: the model's logits width (tokens
        beyond the tokenizer's are never allowed). eos_token_ids: the model's stop ids; a complete
        grammar allows exactly these.
    """

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                      eos_token=list(eos_token_ids) or None)
        self._cache: collections.OrderedDict[tuple[str, str], llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.num_compiles = 0  # cache misses, for tests and logs

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The pristine matcher of `params` (do not advance it; deep_copy it). ValueError naming
        the problem for an invalid schema, regex, grammar or choice list."""
        key = params.key()
        with self._lock:
            matcher = self._cache.get(key)
            if matcher is not None:
                self._cache.move_to_end(key)
                return matcher
        matcher = llguidance.LLMatcher(self.tokenizer, _grammar_text(*key), log_level=0)
        if matcher.is_error():
            raise ValueError(f"Invalid {_LABELS[key[0]]} for structured outputs: {matcher.get_error()}")
        with self._lock:
            self._cache[key] = matcher
            self.num_compiles += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def new_matcher(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for one request (its own state)."""
        return self.compile(params).deep_copy()


# Keywords whose value is a subschema, a list of subschemas, or a map of names to subschemas.
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
              "additionalProperties", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed_objects(schema):
    """The schema with `additionalProperties: false` on every object that lists `properties` and
    does not say otherwise: vLLM's default (xgrammar's strict mode), so the output has the keys
    the schema names and no invented ones. Other objects stay open, and so does everything in
    and beside an `allOf` (closing one branch would forbid the keys another branch names)."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(closed.get(key), dict):
            closed[key] = _closed_objects(closed[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [_closed_objects(item) for item in closed[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: _closed_objects(item) for name, item in closed[key].items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema and "allOf" not in schema:
        closed["additionalProperties"] = False
    return closed


def _grammar_text(kind: str, text: str) -> str:
    """llguidance's grammar definition for a cache key (kind, text)."""
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if kind == "json":
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"Invalid JSON schema for structured outputs: not valid JSON ({exc}).") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"Invalid JSON schema for structured outputs: a schema is an object or a "
                             f"boolean, got {type(schema).__name__}.")
        return llguidance.LLMatcher.grammar_from_json_schema(_closed_objects(schema), overrides=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llguidance.grammar_from("choice", text)
    try:
        return llguidance.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise ValueError(f"Invalid grammar for structured outputs: {exc}") from None
