"""Pydantic models of the OpenAI API bodies the server reads and writes, plus vLLM's extra fields.

Request models validate types and ranges that OpenAI documents; the values SamplingParams checks
itself (e.g. top_p in (0, 1]) are left to it, and what depends on the model or the server's flags
(vocabulary, context length, request limits) to jpaged/request_validation.py, so each check lives
once. Unknown fields are ignored with a warning in the log, as vLLM does, except vLLM's own extra
fields that jpaged does not implement: those are refused with a 400 naming them
(UNSUPPORTED_EXTRA_FIELDS).
"""

import logging
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer

from jpaged.beam_search import BeamSearchParams
from jpaged.sampling_params import RequestOutputKind, SamplingParams
from serving.errors import APIError

logger = logging.getLogger("jpaged.serve")

# --------------------------------------------------------------------------- requests

INT32_MAX = 2**31 - 1


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # with include_usage: every chunk carries the usage so far


# vLLM request fields jpaged does not implement, with the value that means "not used". A request
# setting one to anything else gets a 400 naming it instead of being silently served without it.
UNSUPPORTED_EXTRA_FIELDS: dict[str, Any] = {
    "logits_processors": None,
    "kv_transfer_params": None, "vllm_xargs": None, "mm_processor_kwargs": None, "prompt_embeds": None,
    "guided_decoding_backend": None, "guided_whitespace_pattern": None,
    "documents": None, "echo_last_message": False,
    "watermarking": None, "return_token_offsets": False,
    "return_prompt_text": None, "media_io_kwargs": None, "return_mm_kwargs": None, "ec_transfer_params": None,
}


# Fields a beam search does not honour (it ranks the beams by their raw logprobs and stops only
# at EOS or max_tokens), with the values that mean "not used"; vLLM ignores them, jpaged refuses
# them with a 400 naming the field.
BEAM_SEARCH_UNUSED_FIELDS: dict[str, tuple] = {
    "stop": (None, []), "stop_token_ids": (None, []), "min_tokens": (0,), "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,), "repetition_penalty": (None, 1.0), "logit_bias": (None, {}),
    "prompt_logprobs": (None,), "structured_outputs": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "response_format": (None, {"type": "text"}),
    "allowed_token_ids": (None,), "bad_words": (None, []), "repetition_detection": (None,),
    "thinking_token_budget": (None, -1), "logprob_token_ids": (None, []),
}


class SamplingFields(BaseModel):
    """Sampling fields common to completions and chat (OpenAI's, then vLLM's extras)."""

    model_config = ConfigDict(extra="allow")  # kept to refuse UNSUPPORTED_EXTRA_FIELDS by name

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extra sampling fields
    top_k: int | None = Field(None, le=INT32_MAX)  # the engine packs it as int32
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None  # per prompt token (from the second): its logprob and the top k
    # Structured outputs (serving/structured_outputs.py): vLLM's field, then its older names
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None  # truncate_prompt_tokens keeps the last (left) / first
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words the output never contains (jpaged/token_restrictions.py)
    use_beam_search: bool = False  # n beams (jpaged/beam_search.py) instead of n samples
    length_penalty: float = 1.0  # beam search: scores are cum. logprob / length ** length_penalty
    return_token_ids: bool = False  # the reply carries the prompt's and each choice's token ids
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:N" (None: the server's flag)
    request_id: str | None = None  # the response id's base when no X-Request-Id header names one
    priority: int = 0  # with --scheduling-policy priority: lower runs earlier
    cache_salt: str | None = None  # prefix-cache blocks are shared only among requests of one salt
    stream_interval: int | None = Field(None, ge=1)  # streamed tokens per chunk (raises --stream-interval)
    # end a reply that repeats itself: {"max_pattern_size", "min_pattern_size", "min_count"}
    repetition_detection: dict[str, Any] | None = None
    # most reasoning tokens before `</think>` is forced; needs --reasoning-parser or --reasoning-config
    thinking_token_budget: StrictInt | None = None
    # with logprobs: these tokens' logprobs at every step (top lists: the sampled token, then these)
    logprob_token_ids: list[int] | None = None

    def check_unsupported_extras(self) -> None:
        """400 naming each vLLM extra field this request sets that jpaged does not implement;
        a warning naming (never showing) the other unknown fields, which are ignored as vLLM does."""
        extras = self.model_extra or {}
        used = [name for name, unused in UNSUPPORTED_EXTRA_FIELDS.items()
                if name in extras and extras[name] != unused]
        ignored = sorted(name for name in extras if name not in UNSUPPORTED_EXTRA_FIELDS)
        if ignored:
            logger.warning("The request has fields this server ignores: %s", ", ".join(ignored)[:500])
        if used:
            raise APIError(f"This server does not implement the request field(s) {', '.join(used)}; "
                           "remove them (jpaged refuses them rather than ignoring them).", param=used[0],
                           code="unsupported_field")

    def to_beam_search_params(self, *, max_tokens: int, defaults: dict | None = None) -> BeamSearchParams:
        """vLLM's: n beams, at most max_tokens new tokens each; the temperature (which only
        matters through the sampled token each step lists) as `to_sampling_params` picks it. A
        400 for a field in BEAM_SEARCH_UNUSED_FIELDS set to a value beam search would ignore."""
        for name, unused in BEAM_SEARCH_UNUSED_FIELDS.items():
            if getattr(self, name, None) not in unused:
                raise APIError(f"{name} cannot be used with use_beam_search: beam search ranks beams by their "
                               "logprobs and stops only at EOS or max_tokens.", param=name)
        temperature = self.temperature
        if temperature is None:
            temperature = (defaults or {}).get("temperature", 1.0)
        try:
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                    temperature=temperature, length_penalty=self.length_penalty,
                                    include_stop_str_in_output=self.include_stop_str_in_output,
                                    skip_special_tokens=self.skip_special_tokens)
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            raise APIError(str(exc), param=field if field in type(self).model_fields else None) from None

    def check_prompt_logprobs(self) -> None:
        """vLLM's rules: at least 0 (the whole vocabulary, -1, is over any --max-logprobs), and
        not with stream (the chunks have no place for them)."""
        if self.prompt_logprobs is None:
            return
        if self.prompt_logprobs < 0:
            raise APIError(f"prompt_logprobs must be at least 0, got {self.prompt_logprobs}.",
                           param="prompt_logprobs")
        if self.stream and self.prompt_logprobs > 0:
            raise APIError("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")

    def to_sampling_params(self, *, max_tokens: int | None, logprobs: int | None,
                           prompt_logprobs: int | None, output_kind: RequestOutputKind,
                           defaults: dict | None = None, n: int | None = None) -> SamplingParams:
        """The engine's SamplingParams; a 400 APIError naming the field for values it rejects.

        `defaults`: sampling defaults from the model's generation_config.json (--generation-config),
        used for fields the request leaves unset. `n`: overrides the request's n (best_of)."""
        defaults = defaults or {}

        def pick(name: str, fallback):
            value = getattr(self, name)
            return defaults.get(name, fallback) if value is None else value

        try:
            return SamplingParams(
                n=self.n if n is None else n,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=pick("repetition_penalty", 1.0),
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                logprobs=None if self.logprob_token_ids else logprobs,  # vLLM's: the listed ones instead
                logprob_token_ids=self.logprob_token_ids or None,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logit_bias=self._logit_bias_by_id(),
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                output_kind=output_kind,
                stream_interval=self.stream_interval,
                repetition_detection=self.repetition_detection,
                thinking_token_budget=self.thinking_token_budget,
            )
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            raise APIError(str(exc), param=field if field in type(self).model_fields else None) from None

    def _logit_bias_by_id(self) -> dict[int, float] | None:
        """OpenAI's `{"token id as string": bias}` as `{int: float}` (the engine checks the ids
        against the vocabulary)."""
        if not self.logit_bias:
            return None
        bias_by_id = {}
        for key, bias in self.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}.") from None
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for "
                                 f"token {token_id}.")
            bias_by_id[token_id] = bias
        return bias_by_id


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(None, ge=0)  # at most --max-logprobs (checked by the engine)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    add_special_tokens: bool = True
    response_format: dict[str, Any] | None = None


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class MediaContentPart(BaseModel):
    """A content part that OpenAI's and vLLM's clients send (an image, audio, a file): well formed,
    so it reaches the chat template's content check and gets a 400 naming its type, not a 422."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "video_url", "audio_url", "image_embeds"]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextContentPart | MediaContentPart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's answer to that call

    def to_template_message(self) -> dict[str, Any]:
        """The message as the tokenizer's apply_chat_template takes it (which joins text parts)."""
        content = [part.model_dump() for part in self.content] if isinstance(self.content, list) else self.content
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls is not None:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # at most --max-logprobs (checked by the engine)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    response_format: dict[str, Any] | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # leave the last (assistant) message open to be continued
    echo: bool = False  # the reply starts with the last message's content when its role is the reply's
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    include_reasoning: bool = True  # with --reasoning-parser: false leaves `reasoning` out of the reply
    # OpenAI's: handed to the chat template as `reasoning_effort`, and `enable_thinking` (effort != "none")
    # unless chat_template_kwargs sets it (vLLM's rule)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None

    def template_kwargs(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The chat template's extra arguments: the server's defaults (--default-chat-template-kwargs),
        then the request's chat_template_kwargs, then reasoning_effort as vLLM passes it."""
        kwargs = {**defaults, **(self.chat_template_kwargs or {})}
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
            if "enable_thinking" not in (self.chat_template_kwargs or {}):
                kwargs["enable_thinking"] = self.reasoning_effort != "none"
        return kwargs

    def reply_role(self, response_role: str = "assistant") -> str:
        """The role of the reply, as vLLM names it: `response_role` (--response-role) when a
        generation prompt is added, else the last message's (the reply continues it)."""
        return response_role if self.add_generation_prompt else self.messages[-1].role


class TokenizeRequest(BaseModel):
    """POST /tokenize: either `prompt` or chat `messages` (vLLM's shape)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter: serve the adapter at lora_path as model lora_name."""

    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter."""

    lora_name: str = ""


class AbortRequestsRequest(BaseModel):
    """POST /abort_requests (VLLM_SERVER_DEV_MODE): the requests to end, by reply or engine id;
    none named: every request in flight."""

    request_ids: list[str] | None = None


class StartProfileRequest(BaseModel):
    """POST /start_profile (with --profiler-config): this trace's overrides of the config's."""

    profile_prefix: str | None = None
    delay_iterations: int | None = None
    max_iterations: int | None = None


class UpdateWeightsRequest(BaseModel):
    """POST /update_weights_from_disk: a checkpoint folder (or .gguf) on the server."""

    model_path: str = Field(min_length=1)
    load_format: Literal["auto", "safetensors", "gguf", "orbax"] = "auto"


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None  # chat, with --reasoning-parser


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: four parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class _KeepsNullFields(BaseModel):
    """A choice whose `_null_fields` are written even when None, also in streamed chunks (whose
    other None fields are left out): vLLM's chunks carry `"finish_reason": null` and the like, and
    clients read them without checking."""

    _null_fields: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _with_null_fields(self, handler):
        data = handler(self)
        for name in self._null_fields:
            data.setdefault(name, None)
        return data


class PromptLogprob(BaseModel):
    """vLLM's entry of `prompt_logprobs`: one token's logprob, 1-based rank and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's `prompt_logprobs`: per prompt token, None for the first, then {token id: entry} holding
# the prompt's own token and the top k.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(_KeepsNullFields):
    _null_fields = ("logprobs", "finish_reason", "stop_reason")

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # not streamed
    prompt_token_ids: list[int] | None = None  # return_token_ids (streamed: in the prompt's first chunk)
    token_ids: list[int] | None = None  # return_token_ids: this choice's (streamed: the chunk's) token ids


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning: str | None = None  # with --reasoning-parser (vLLM's field)
    tool_calls: list[ToolCall] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _without_empty_tool_calls(self, handler):
        """No `tool_calls` key when there are none, as OpenAI and vLLM answer: JavaScript clients
        test `if (message.tool_calls)`, which an empty list passes."""
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_KeepsNullFields):
    _null_fields = ("logprobs", "finish_reason")

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: the chunk's new token ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: in the first chunk


class ModelCard(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jpaged"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
