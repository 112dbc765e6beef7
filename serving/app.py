"""The Starlette application: routes, API-key guard, CORS, error handlers."""

import dataclasses
import hashlib
import hmac
import importlib.metadata
import uuid
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.chat import create_chat_completion, render_chat_completion, render_chat_prompt
from serving.completions import create_completion, render_completion
from serving.context import ServingContext, parse_json
from serving.dev_routes import DEV_ROUTES, PROFILE_ROUTES
from serving.embeddings import create_embedding
from serving.errors import (APIError, api_error_handler, http_exception_handler,
                            unexpected_error_handler)
from serving.generate_tokens import abort_generate_requests, create_generate, scale_out_disabled
from serving.generative_scoring import create_generative_scoring
from serving.messages import count_message_tokens, create_message, render_message
from serving.protocol import (DetokenizeRequest, DetokenizeResponse, LoadLoRAAdapterRequest, ModelCard, ModelList,
                              TokenizeRequest, TokenizeResponse, UnloadLoRAAdapterRequest, UpdateWeightsRequest)
from serving.responses import cancel_response, create_response, delete_response, render_response, retrieve_response


@dataclasses.dataclass
class CORSSettings:
    """vLLM's --allowed-origins, --allow-credentials, --allowed-methods, --allowed-headers."""

    allowed_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    allowed_methods: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = dataclasses.field(default_factory=lambda: ["*"])


def _digest(value: bytes) -> bytes:
    """Fixed-length digests, so the compare takes the same time whatever the header's length."""
    return hashlib.sha256(value).digest()


# Routes that reach the model; /health, /ping, /version and /metrics stay open, as in vLLM.
# /invocations is guarded too (vLLM leaves it open, a limitation its docs warn about).
GUARDED_PREFIXES = ("/v1", "/inference", "/generative_scoring", "/invocations", "/tokenize", "/tokenizer_info",
                    "/detokenize", "/update_weights_from_disk", "/sleep", "/wake_up", "/is_sleeping",
                    *(route.path for route in DEV_ROUTES + PROFILE_ROUTES))


class RootPathMiddleware:
    """--root-path: the prefix a path-routing proxy serves the app under. Requests may come with
    it (a proxy that keeps the prefix) or without (one that strips it); the router drops it."""

    def __init__(self, app: ASGIApp, root_path: str):
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path routes match: without the --root-path prefix where it is a whole first segment
    (Starlette's router drops it the same way; "/proxyv1" under "/proxy" stays as it is)."""
    root, path = scope.get("root_path", ""), scope["path"]
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):]
    return path


class APIKeyMiddleware:
    """Requires one of the keys, as `Authorization: Bearer <key>` (the scheme in any case, as vLLM
    reads it) or as Anthropic's `x-api-key: <key>`, on every route that reaches the model
    (GUARDED_PREFIXES), comparing digests in constant time against every key. It holds only the
    keys' digests, so no key is anywhere in the app to be logged or echoed."""

    def __init__(self, app: ASGIApp, key_digests: list[bytes]):
        self.app = app
        self.key_digests = key_digests

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = [_digest(token.encode()) if scheme.lower() == "bearer" else b"",
                 _digest(headers.get("x-api-key", "").encode())]
        matched = False
        for key in self.key_digests:  # every comparison runs, whichever matches
            for digest in given:
                matched |= hmac.compare_digest(digest, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and _route_path(scope).startswith(GUARDED_PREFIXES)
        if guarded and scope["method"] != "OPTIONS":  # CORS preflights carry no credentials
            if not self._authorized(Headers(scope=scope)):
                error = APIError("Missing or incorrect API key: send 'Authorization: Bearer <key>' (or "
                                 "'x-api-key: <key>') with a key the server was started with (--api-key, or "
                                 "JPAGED_API_KEY / VLLM_API_KEY).", status_code=HTTPStatus.UNAUTHORIZED,
                                 code="invalid_api_key")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


DEFAULT_MAX_HEADER_BYTES = 32 * 1024


def h11_buffer_bytes(max_header_bytes: int) -> int:
    """uvicorn's `h11_max_incomplete_event_size` for a given header limit.

    h11 answers a plain 400 once a request head it has not finished reading outgrows its buffer
    (16 KiB by default), so whether a header under our limit passes depended on how TCP split it.
    With room for the request line and the framing, HeaderLimitMiddleware decides instead.
    """
    return max_header_bytes + 16 * 1024


class HeaderLimitMiddleware:
    """431 for a request whose headers total more than `max_bytes` (names + values)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.max_bytes:
                error = APIError(f"The request headers are {size} bytes, over the server's limit of "
                                 f"{self.max_bytes} bytes (--max-header-bytes).",
                                 status_code=HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, code="headers_too_large")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestIdHeaderMiddleware:
    """--enable-request-id-headers: every response carries X-Request-Id, the request's own or a
    new one (vLLM's)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


# The routes that run the model, counted by --enable-server-load-tracking (GET /load).
LOAD_TRACKED_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations")


class ServerLoadMiddleware:
    """Counts the requests to LOAD_TRACKED_PREFIXES being answered (streams until their last
    byte) in `app.state.server_load`, which GET /load reports."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _route_path(scope).startswith(LOAD_TRACKED_PREFIXES):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        state.server_load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.server_load -= 1


def _context(request: Request) -> ServingContext:
    return request.app.state.ctx


async def health(request: Request) -> Response:
    """200 when the engine is warm and running, 503 otherwise."""
    _context(request).check_ready()
    return Response(status_code=HTTPStatus.OK)


async def load(request: Request) -> JSONResponse:
    """vLLM's GET /load: requests in flight on the model's routes (0 unless
    --enable-server-load-tracking)."""
    return JSONResponse({"server_load": request.app.state.server_load})


async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": importlib.metadata.version("jpaged")})


async def list_models(request: Request) -> JSONResponse:
    ctx = _context(request)
    cards = [ModelCard(id=name, root=ctx.engine.engine_args.model, max_model_len=ctx.max_model_len)
             for name in ctx.served_model_names]
    cards += [ModelCard(id=name, root=lora.lora_path, parent=lora.base_model_name or ctx.served_model_name,
                        max_model_len=ctx.max_model_len) for name, lora in ctx.lora_requests.items()]
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


async def invocations(request: Request) -> Response:
    """SageMaker's POST /invocations (vLLM's): a body with `messages` is a chat completion, one
    with `prompt` a completion; on a pooling server (--runner pooling) every body is an embedding
    request. The handler reads the body again from a replay of its bytes."""
    ctx = _context(request)
    body = await ctx.read_bytes(request)
    data = parse_json(body)
    fields = data if isinstance(data, dict) else {}
    if ctx.engine.pooler_config is not None:
        handler = create_embedding
    elif "messages" in fields:
        handler = create_chat_completion
    elif "prompt" in fields:
        handler = create_completion
    else:
        raise APIError("Cannot find a handler for this request: send a chat completion (with `messages`) or "
                       "a completion (with `prompt`).")
    replayed = False

    async def receive() -> dict:
        nonlocal replayed
        if replayed:  # then the client's own messages: a disconnect aborts the request
            return await request.receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return await handler(Request(request.scope, receive))


async def tokenize(request: Request) -> JSONResponse:
    ctx = _context(request)
    body = await ctx.read_body(request, TokenizeRequest)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError("Send exactly one of `prompt` or `messages`.", param="prompt")
    if body.messages is not None:
        text = render_chat_prompt(ctx, body.messages, body.add_generation_prompt, None, None,
                                  body.continue_final_message)
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
        ctx.check_token_ids(body.tokens, "tokens")
    text = ctx.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump(mode="json"))


async def tokenizer_info(request: Request) -> JSONResponse:
    """vLLM's GET /tokenizer_info: the tokenizer's settings, class and chat template
    (Tokenizer.info); only routed with --enable-tokenizer-info-endpoint."""
    return JSONResponse(_context(request).tokenizer.info())


async def metrics(request: Request) -> Response:
    return Response(_context(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def sleep(request: Request) -> JSONResponse:
    """vLLM's POST /sleep?level=1&mode=abort (sleep mode, --enable-sleep-mode): AsyncLLM.sleep;
    400 for a bad level or mode."""
    ctx = _context(request)
    ctx.check_ready()
    try:
        level = int(request.query_params.get("level", "1"))
    except ValueError:
        raise APIError(f"sleep: level must be 0, 1 or 2, got {request.query_params['level']!r}",
                       param="level") from None
    mode = request.query_params.get("mode", "abort")
    try:
        await ctx.engine.sleep(level, mode)
    except ValueError as exc:
        raise APIError(f"sleep: {exc}", param="mode" if "mode must" in str(exc) else "level") from None
    return JSONResponse({"status": "sleeping", "level": level})


async def wake_up(request: Request) -> JSONResponse:
    """vLLM's POST /wake_up?tags=weights&tags=kv_cache (no tags: all): AsyncLLM.wake_up."""
    ctx = _context(request)
    ctx.check_ready()
    tags = request.query_params.getlist("tags") or None
    try:
        awake = await ctx.engine.wake_up(tags)
    except ValueError as exc:
        raise APIError(f"wake_up: {exc}", param="tags") from None
    return JSONResponse({"status": "awake" if awake else "sleeping", "tags": tags})


async def is_sleeping(request: Request) -> JSONResponse:
    """vLLM's GET /is_sleeping: {"is_sleeping": bool}."""
    return JSONResponse({"is_sleeping": await _context(request).engine.is_sleeping()})


async def update_weights_from_disk(request: Request) -> JSONResponse:
    """Loads the checkpoint at `model_path` on the server and swaps its params in between two
    steps (same structure, shapes and dtypes as the served model, else 400). For RL rollouts;
    only routed with --enable-update-weights-route."""
    ctx = _context(request)
    body = await ctx.read_body(request, UpdateWeightsRequest)
    ctx.check_ready()
    try:
        await ctx.engine.update_weights_from_disk(body.model_path, body.load_format)
    except ValueError as exc:  # ModelLoadError included
        raise APIError(f"update_weights: {exc}", param="model_path") from None
    return JSONResponse({"success": True, "model_path": body.model_path})


async def load_lora_adapter(request: Request) -> PlainTextResponse:
    """Serves a LoRA adapter as a model of its own (ServingContext.load_lora_adapter); only routed
    with VLLM_ALLOW_RUNTIME_LORA_UPDATING set."""
    ctx = _context(request)
    body = await ctx.read_body(request, LoadLoRAAdapterRequest)
    await ctx.load_lora_adapter(body.lora_name, body.lora_path, load_inplace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    ctx = _context(request)
    body = await ctx.read_body(request, UnloadLoRAAdapterRequest)
    ctx.unload_lora_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def build_app(ctx: ServingContext, *, api_keys: list[str] | None = None, cors: CORSSettings | None = None,
              enable_update_weights_route: bool = False, enable_lora_updating: bool = False,
              max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, enable_request_id_headers: bool = False,
              enable_server_load_tracking: bool = False, root_path: str = "",
              enable_tokenizer_info_endpoint: bool = False, enable_sleep_mode: bool = False,
              server_dev_mode: bool = False, enable_profiler: bool = False,
              enable_scale_out: bool = False) -> Starlette:
    """The ASGI app serving `ctx`'s engine; `api_keys` (if any) guard GUARDED_PREFIXES, `cors`
    (if set) answers browsers' cross-origin requests; enable_lora_updating routes
    /v1/load_lora_adapter and /v1/unload_lora_adapter, server_dev_mode (VLLM_SERVER_DEV_MODE)
    serving/dev_routes.py's, enable_profiler (the engine's profiler_config) /start_profile and
    /stop_profile, enable_scale_out (--enable-scale-out) serving/generate_tokens.py's routes (else
    they answer 403); the other keywords are the server's flags of those names."""
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),  # vLLM's (SageMaker's) name for the same check
        Route("/version", version, methods=["GET"]),
        Route("/load", load, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/messages", create_message, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_message_tokens, methods=["POST"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/generative_scoring", create_generative_scoring, methods=["POST"]),
        Route("/v1/embeddings", create_embedding, methods=["POST"]),
        Route("/v1/responses/{response_id}", retrieve_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
    ]
    scale_out = {"/inference/v1/generate": create_generate, "/inference/v1/abort_requests": abort_generate_requests,
                 "/v1/chat/completions/render": render_chat_completion, "/v1/completions/render": render_completion,
                 "/v1/messages/render": render_message, "/v1/responses/render": render_response}
    routes += [Route(path, handler if enable_scale_out else scale_out_disabled, methods=["POST"])
               for path, handler in scale_out.items()]
    if enable_sleep_mode:
        routes += [Route("/sleep", sleep, methods=["POST"]), Route("/wake_up", wake_up, methods=["POST"]),
                   Route("/is_sleeping", is_sleeping, methods=["GET"])]
    if server_dev_mode:
        routes += DEV_ROUTES
    if enable_profiler:
        routes += PROFILE_ROUTES
    if enable_update_weights_route:
        routes.append(Route("/update_weights_from_disk", update_weights_from_disk, methods=["POST"]))
    if enable_tokenizer_info_endpoint:
        routes.append(Route("/tokenizer_info", tokenizer_info, methods=["GET"]))
    if enable_lora_updating:
        routes += [Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
                   Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"])]
    middleware = [Middleware(HeaderLimitMiddleware, max_bytes=max_header_bytes)]
    if root_path:  # outermost: every other layer sees the prefix
        middleware.insert(0, Middleware(RootPathMiddleware, root_path=root_path.rstrip("/")))
    if cors is not None:  # outermost, so preflights and 401s carry the CORS headers
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors.allowed_origins,
                                     allow_credentials=cors.allow_credentials, allow_methods=cors.allowed_methods,
                                     allow_headers=cors.allowed_headers))
    if enable_request_id_headers:  # outside the key check, so a 401 carries the id too
        middleware.append(Middleware(RequestIdHeaderMiddleware))
    if api_keys:
        middleware.append(Middleware(APIKeyMiddleware, key_digests=[_digest(key.encode()) for key in api_keys]))
    if enable_server_load_tracking:
        middleware.append(Middleware(ServerLoadMiddleware))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        APIError: api_error_handler,
        HTTPException: http_exception_handler,
        Exception: unexpected_error_handler,
    })
    app.state.ctx = ctx
    app.state.server_load = 0
    return app
