"""Engine logprobs (one `{token_id: Logprob}` dict per token) in OpenAI's two response shapes."""

from jpaged.outputs import Logprob
from serving.protocol import (ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs,
                              PromptLogprob, PromptLogprobs)

# JSON has no -inf; OpenAI and vLLM clamp to this.
MIN_LOGPROB = -9999.0


def _token_text(token_id: int, logprob: Logprob | None, tokenizer, as_token_id: bool = False) -> str:
    """The token's text, or "token_id:N" (vLLM's --return-tokens-as-token-ids form)."""
    if as_token_id:
        return f"token_id:{token_id}"
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _clamp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _top_entries(step: dict[int, Logprob], num_top: int | None) -> list[tuple[int, Logprob]]:
    """The step's `num_top` best tokens (rank 1..num_top), best first; num_top None: every entry
    in the engine's order (the sampled token, then logprob_token_ids', as vLLM lists them)."""
    if num_top is None:
        return list(step.items())
    ranked = [(tid, lp) for tid, lp in step.items() if lp.rank is not None and lp.rank <= num_top]
    return sorted(ranked, key=lambda item: item[1].rank)


def completion_logprobs(token_ids: list[int], steps: list[dict[int, Logprob] | None], num_top: int | None,
                        tokenizer, text_offset: int, as_token_ids: bool = False) -> CompletionLogprobs:
    """OpenAI completions `logprobs` for `token_ids` whose text starts at char `text_offset`.

    A None step (the first prompt token under echo) has logprob None and top_logprobs None.
    Each top_logprobs dict holds the `num_top` best tokens and the chosen one, as vLLM's does
    (num_top None: every entry, for logprob_token_ids).
    `as_token_ids`: tokens are named "token_id:N" (text_offset then counts those names, as vLLM's).
    """
    result = CompletionLogprobs()
    for token_id, step in zip(token_ids, steps, strict=True):
        chosen = step.get(token_id) if step is not None else None
        text = _token_text(token_id, chosen, tokenizer, as_token_ids)
        result.tokens.append(text)
        result.token_logprobs.append(None if chosen is None else _clamp(chosen.logprob))
        result.text_offset.append(text_offset)
        text_offset += len(text)
        if step is None:
            result.top_logprobs.append(None)
            continue
        top = {_token_text(tid, lp, tokenizer, as_token_ids): _clamp(lp.logprob)
               for tid, lp in _top_entries(step, num_top)}
        if chosen is not None:
            top.setdefault(text, _clamp(chosen.logprob))
        result.top_logprobs.append(top)
    return result


def chat_logprobs(token_ids: list[int], steps: list[dict[int, Logprob]], num_top: int | None,
                  tokenizer, as_token_ids: bool = False) -> ChatLogprobs:
    """OpenAI chat `logprobs.content`: per token its text, logprob, UTF-8 bytes and top list (num_top
    None: every entry, for logprob_token_ids).
    `as_token_ids`: tokens are named "token_id:N"; a sampled token's bytes stay its text's (vLLM's)."""
    content = []
    for token_id, step in zip(token_ids, steps, strict=True):
        chosen = step.get(token_id)
        text = _token_text(token_id, chosen, tokenizer)
        top = []
        for tid, lp in _top_entries(step, num_top):
            top_text = _token_text(tid, lp, tokenizer, as_token_ids)
            top.append(ChatTopLogprob(token=top_text, logprob=_clamp(lp.logprob),
                                      bytes=list(top_text.encode("utf-8"))))
        content.append(ChatTokenLogprob(
            token=_token_text(token_id, chosen, tokenizer, as_token_ids),
            logprob=_clamp(chosen.logprob) if chosen is not None else MIN_LOGPROB,
            bytes=list(text.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)


def prompt_logprobs(entries: list[dict[int, Logprob] | None] | None) -> PromptLogprobs | None:
    """The engine's prompt logprobs in vLLM's response shape, -inf clamped for JSON."""
    if entries is None:
        return None
    return [None if entry is None else
            {tid: PromptLogprob(logprob=_clamp(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
             for tid, lp in entry.items()}
            for entry in entries]
