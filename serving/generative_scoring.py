"""POST /generative_scoring: vLLM's generative scoring API. For each item, the probability that the
model's next token after query + item (or item + query) is the first of `label_token_ids`:
normalised over the labels alone (`apply_softmax`, the default) or over the whole vocabulary.

Each item is one request of one output token whose logprobs list the labels
(SamplingParams.logprob_token_ids), so a scoring costs one prefill per item and shares the
query's KV blocks through the prefix cache.
"""

import math
import time
import uuid

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.sampling_params import RequestOutputKind, SamplingParams
from serving.context import ServingContext
from serving.errors import APIError
from serving.protocol import UsageInfo
from serving.streaming import CLIENT_CLOSED_REQUEST, final_outputs


class GenerativeScoringRequest(BaseModel):
    model: str | None = None
    query: str | list[int]
    items: list[str] | list[list[int]]
    label_token_ids: list[int]
    apply_softmax: bool = True  # normalise over the labels only; False: the model's own probabilities
    item_first: bool = False  # items before the query
    add_special_tokens: bool = True  # for a text query (items never get them)
    cache_salt: str | None = Field(None, min_length=1)
    priority: int = 0
    request_id: str | None = None


def _prompt(ctx: ServingContext, body: GenerativeScoringRequest, query: list[int], item: str | list[int]) -> list[int]:
    """query + item (item + query with item_first), cut to leave one token of context (vLLM's)."""
    if isinstance(item, str):
        item_ids = ctx.tokenizer.encode(item, add_special_tokens=False)
    else:
        ctx.check_token_ids(item, "items")
        item_ids = list(item)
    token_ids = item_ids + query if body.item_first else query + item_ids
    return token_ids[:ctx.max_model_len - 1]


def _score(logprobs: list[float], apply_softmax: bool) -> float:
    """The first label's probability, over the labels (apply_softmax) or the vocabulary."""
    if not apply_softmax:
        return math.exp(logprobs[0])
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return weights[0] / sum(weights)


async def create_generative_scoring(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, GenerativeScoringRequest)
    model_name = ctx.check_model(body.model)
    ctx.check_ready()
    if not body.label_token_ids:
        raise APIError("label_token_ids must contain at least one token ID.", param="label_token_ids")
    vocab_size = ctx.validator.vocab_size
    for token_id in body.label_token_ids:
        if not 0 <= token_id < vocab_size:
            raise APIError(f"label_token_id {token_id} is out of vocabulary range [0, {vocab_size}). Please "
                           "provide valid token IDs.", param="label_token_ids")
    if not body.items:
        raise APIError("items must contain at least one item.", param="items")
    ctx.check_num_prompts(len(body.items))
    if isinstance(body.query, str):
        query = ctx.tokenizer.encode(body.query, add_special_tokens=body.add_special_tokens)
    else:
        ctx.check_token_ids(body.query, "query")
        query = list(body.query)
    prompts = [_prompt(ctx, body, query, item) for item in body.items]
    try:
        params = SamplingParams(temperature=0, max_tokens=1, logprob_token_ids=body.label_token_ids,
                                output_kind=RequestOutputKind.FINAL_ONLY)
    except ValueError as exc:
        raise APIError(str(exc), param="label_token_ids") from None
    for prompt in prompts:
        ctx.validate(prompt, params, "items")
    client_request_id = ctx.client_request_id(request, body.request_id)
    request_id = f"generative-scoring-{client_request_id or uuid.uuid4().hex}"
    engine_id = ctx.engine_request_id(request_id, client_request_id)
    lora_request = ctx.lora_request(model_name)
    finals = await final_outputs(request, [ctx.generate(prompt, params, f"{engine_id}-{i}", time.time(), lora_request,
                                                        body.priority, body.cache_salt, reply_id=request_id)
                                           for i, prompt in enumerate(prompts)])
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    data = []
    for i, final in enumerate(finals):
        (step,) = final.outputs[0].logprobs
        data.append({"index": i, "object": "score",
                     "score": _score([step[t].logprob for t in body.label_token_ids], body.apply_softmax)})
    prompt_tokens = sum(map(len, prompts))
    completion_tokens = sum(len(final.outputs[0].token_ids) for final in finals)
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()), "model": model_name,
                         "data": data, "usage": usage.model_dump(mode="json")})
