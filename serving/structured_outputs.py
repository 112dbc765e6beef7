"""The request fields that constrain a completion's text, as one StructuredOutputsParams.

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}), vLLM's `structured_outputs` extra field ({"json" | "regex" |
"choice" | "grammar" | "json_object": ...}) and its older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` fields. At most one of them may be set. Whether a schema, regex
or grammar is itself valid is decided by the engine's compiler (a 400 before the request is queued).
"""

from typing import Any

from jpaged.structured_output import StructuredOutputsParams
from serving.errors import APIError

_STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's options that jpaged's compiler always behaves as one setting of: JSON has no free
# whitespace, listed properties are all there is, and there is one backend. Accepted, not used.
_FIXED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "disable_fallback")
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def _from_response_format(response_format: dict[str, Any]) -> dict[str, Any] | None:
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        json_schema = response_format.get("json_schema")
        if not isinstance(json_schema, dict) or not isinstance(json_schema.get("schema"), (dict, bool)):
            raise APIError("response_format of type 'json_schema' needs a json_schema object with a "
                           "'schema' (a JSON schema object).", param="response_format")
        return {"json": json_schema["schema"]}
    raise APIError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                   "'json_schema'.", param="response_format")


def _from_structured_outputs(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(_STRUCTURED_OUTPUTS_KEYS) - set(_FIXED_OPTIONS))
    if unknown:
        raise APIError(f"structured_outputs fields {unknown} are not supported; use one of "
                       f"{list(_STRUCTURED_OUTPUTS_KEYS)}.", param="structured_outputs")
    for option in _FIXED_OPTIONS:
        if not isinstance(fields.get(option, False), bool):
            raise APIError(f"structured_outputs.{option} must be a boolean.", param="structured_outputs")
    return {key: value for key, value in fields.items() if value is not None and key not in _FIXED_OPTIONS}


def structured_outputs_from_request(body) -> StructuredOutputsParams | None:
    """The constraint a completions or chat body asks for (None: free text); 400 APIError for an
    unsupported or ill-formed one, or for several at once."""
    sources: list[tuple[str, dict[str, Any]]] = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None:
        fields = _from_response_format(response_format)
        if fields is not None:
            sources.append(("response_format", fields))
    if body.structured_outputs is not None:
        sources.append(("structured_outputs", _from_structured_outputs(body.structured_outputs)))
    for name, key in _GUIDED_FIELDS.items():
        value = getattr(body, name)
        if value is not None:
            sources.append((name, {key: value}))
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise APIError(f"Only one structured-outputs constraint may be set per request; got {names}.",
                       param=sources[1][0])
    name, fields = sources[0]
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as exc:
        raise APIError(f"Invalid {name}: {exc}", param=name) from None
