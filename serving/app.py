"""The Starlette application: routes, API-key guard, error handlers."""

import hmac
import importlib.metadata
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.chat import create_chat_completion, render_chat_prompt
from serving.completions import create_completion
from serving.context import ServingContext
from serving.errors import (APIError, api_error_handler, http_exception_handler,
                            unexpected_error_handler)
from serving.protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                              TokenizeRequest, TokenizeResponse)


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every /v1 route (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                error = APIError("Missing or incorrect API key: send 'Authorization: Bearer <key>' "
                                 "with the key the server was started with (--api-key or "
                                 "JPAGED_API_KEY).", status_code=HTTPStatus.UNAUTHORIZED,
                                 code="invalid_api_key")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _context(request: Request) -> ServingContext:
    return request.app.state.ctx


async def health(request: Request) -> Response:
    """200 when the engine is warm and running, 503 otherwise."""
    _context(request).check_ready()
    return Response(status_code=HTTPStatus.OK)


async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": importlib.metadata.version("jpaged")})


async def list_models(request: Request) -> JSONResponse:
    ctx = _context(request)
    card = ModelCard(id=ctx.served_model_name, root=ctx.engine.engine_args.model,
                     max_model_len=ctx.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))


async def tokenize(request: Request) -> JSONResponse:
    ctx = _context(request)
    body = await ctx.read_body(request, TokenizeRequest)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError("Send exactly one of `prompt` or `messages`.", param="prompt")
    if body.messages is not None:
        text = render_chat_prompt(ctx, body.messages, body.add_generation_prompt, None, None)
        add_special = bool(body.add_special_tokens)
    else:
        text = body.prompt
        add_special = body.add_special_tokens is None or body.add_special_tokens
    tokens = ctx.tokenizer.encode(text, add_special_tokens=add_special)
    strs = ctx.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    response = TokenizeResponse(count=len(tokens), max_model_len=ctx.max_model_len, tokens=tokens,
                                token_strs=strs)
    return JSONResponse(response.model_dump(mode="json"))


async def detokenize(request: Request) -> JSONResponse:
    ctx = _context(request)
    body = await ctx.read_body(request, DetokenizeRequest)
    ctx.check_model(body.model)
    if body.tokens:
        ctx.check_prompt_tokens(body.tokens, "tokens")
    text = ctx.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump(mode="json"))


async def metrics(request: Request) -> Response:
    return Response(_context(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def build_app(ctx: ServingContext, *, api_key: str | None = None) -> Starlette:
    """The ASGI app serving `ctx`'s engine; `api_key` (if set) guards /v1 routes."""
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
    ]
    middleware = [Middleware(APIKeyMiddleware, api_key=api_key)] if api_key else []
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        APIError: api_error_handler,
        HTTPException: http_exception_handler,
        Exception: unexpected_error_handler,
    })
    app.state.ctx = ctx
    return app
