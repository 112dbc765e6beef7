"""POST /v1/embeddings: OpenAI's embeddings API (and vLLM's extras) over a pooling engine
(`--runner pooling`, jpaged/pooling.py).

`input` takes OpenAI's four forms (a text, texts, token ids, lists of token ids), or vLLM's chat
form `messages` rendered with the chat template. Each input is one engine request, embedded in
the same paged batches as any prefill; the reply lists the vectors in input order, as float lists
or (encoding_format "base64") the base64 of their little-endian float32 bytes.
"""

import base64
import time
import uuid
from http import HTTPStatus
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.pooling import PoolingParams
from serving.chat import render_chat_prompt
from serving.context import ServingContext
from serving.errors import APIError
from serving.protocol import ChatMessage, UsageInfo
from serving.streaming import CLIENT_CLOSED_REQUEST, final_outputs


class EmbeddingRequest(BaseModel):
    """OpenAI's fields, then vLLM's (`messages` in place of `input`, as vLLM's chat embedding request)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = False  # with messages
    continue_final_message: bool = False  # with messages
    add_special_tokens: bool | None = None  # default: true for input, false for messages (the template has them)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    normalize: bool | None = None  # default: the model's pooler setting
    priority: int = 0
    request_id: str | None = None


def _inputs(ctx: ServingContext, body: EmbeddingRequest) -> list[list[int]]:
    """Every input's token ids, truncated as truncate_prompt_tokens says."""
    if (body.input is None) == (body.messages is None):
        raise APIError("Send exactly one of `input` or `messages`.", param="input")
    if body.messages is not None:
        text = render_chat_prompt(ctx, body.messages, body.add_generation_prompt, None, None,
                                  body.continue_final_message)
        inputs = [ctx.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))]
    else:
        items = body.input
        if isinstance(items, str) or (items and isinstance(items[0], int)):
            items = [items]
        if not items:
            raise APIError("The input is empty: send a text, a list of texts or token ids.", param="input")
        ctx.check_num_prompts(len(items))
        add_special = body.add_special_tokens is None or body.add_special_tokens
        inputs = []
        for item in items:
            if isinstance(item, str):
                inputs.append(ctx.tokenizer.encode(item, add_special_tokens=add_special))
            else:
                ctx.check_token_ids(item, "input")
                inputs.append(list(item))
    return [ctx.truncate_prompt(token_ids, body.truncate_prompt_tokens, None) for token_ids in inputs]


def _check(ctx: ServingContext, model_name: str, params: PoolingParams, inputs: list[list[int]]) -> None:
    """The whole batch's 400s before any input runs: `dimensions` the model cannot give, an input
    too long for the context (the engine checks each again)."""
    try:
        ctx.engine.pooler_config.check(params, model_name, ctx.engine.model_config.hidden_size)
    except ValueError as exc:
        raise APIError(str(exc), param="dimensions") from None
    for token_ids in inputs:
        if not token_ids:
            raise APIError("An input is empty: it has no tokens to embed.", param="input")
        if len(token_ids) >= ctx.max_model_len:
            raise APIError(f"This model's maximum context length is {ctx.max_model_len} tokens. However, you "
                           f"requested {len(token_ids)} tokens in the input for embedding generation (at most "
                           f"{ctx.max_model_len - 1} fit). Please reduce the length of the input.", param="input")


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def create_embedding(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, EmbeddingRequest)
    model_name = ctx.check_model(body.model)
    ctx.check_ready()
    if ctx.engine.pooler_config is None:
        raise APIError("The model does not support Embeddings API: this server generates text. Start it with "
                       "--runner pooling to serve embeddings.", status_code=HTTPStatus.NOT_FOUND,
                       type="NotFoundError")
    inputs = _inputs(ctx, body)
    params = PoolingParams(dimensions=body.dimensions, normalize=body.normalize)
    _check(ctx, model_name, params, inputs)
    client_request_id = ctx.client_request_id(request, body.request_id)
    request_id = f"embd-{client_request_id or uuid.uuid4().hex}"
    engine_id = ctx.engine_request_id(request_id, client_request_id)
    lora_request = ctx.lora_request(model_name)
    now = time.time()
    finals = await final_outputs(request, [ctx.encode(token_ids, params, f"{engine_id}-{i}", now, lora_request,
                                                      body.priority, reply_id=request_id)
                                           for i, token_ids in enumerate(inputs)])
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    data = [{"index": i, "object": "embedding", "embedding": _encode(final.outputs.data, body.encoding_format)}
            for i, final in enumerate(finals)]
    num_tokens = sum(map(len, inputs))
    usage = UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens)
    return JSONResponse({"id": request_id, "object": "list", "created": int(now), "model": model_name,
                         "data": data, "usage": usage.model_dump(mode="json", exclude_none=True)})
