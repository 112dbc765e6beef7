"""vLLM's development routes: with VLLM_SERVER_DEV_MODE=1 (as vLLM routes them), pause and
resume scheduling around a weight update, end requests in flight, empty the prefix cache and
show the server's settings; with --profiler-config, start and stop a JAX trace of the engine's
steps. For RL loops, benchmarks and profiling on a server one owns; guarded by --api-key."""

import dataclasses
import os
import platform

import jax
import jaxlib
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jpaged.cpu_features import cpu_flags
from serving.context import ServingContext
from serving.errors import APIError
from serving.protocol import AbortRequestsRequest, StartProfileRequest

def _query_bool(request: Request, name: str, default: bool) -> bool:
    """A boolean query parameter as FastAPI (vLLM) reads it: true/false, 1/0, yes/no, on/off."""
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise APIError(f"{name} must be true or false, got {value!r}.", param=name)


def _ready_context(request: Request) -> ServingContext:
    ctx: ServingContext = request.app.state.ctx
    ctx.check_ready()
    return ctx


async def pause(request: Request) -> JSONResponse:
    """POST /pause?mode=abort&clear_cache=true: AsyncLLM.pause_generation. Requests sent while
    paused wait; mode "abort" ends those in flight, "wait" lets them finish first (the reply
    comes then), "keep" freezes them; clear_cache (not with "keep") empties the prefix cache."""
    ctx = _ready_context(request)
    clear_cache = _query_bool(request, "clear_cache", True)
    try:  # the engine checks the mode (LLMEngine.pause)
        await ctx.engine.pause_generation(mode=request.query_params.get("mode", "abort"), clear_cache=clear_cache)
    except ValueError as exc:
        raise APIError(f"pause: {exc}", param="mode") from None
    return JSONResponse({"status": "paused"})


async def resume(request: Request) -> JSONResponse:
    """POST /resume: scheduling goes on (400 while --enable-sleep-mode's sleep keeps memory released)."""
    ctx = _ready_context(request)
    try:
        await ctx.engine.resume_generation()
    except ValueError as exc:
        raise APIError(f"resume: {exc}") from None
    return JSONResponse({"status": "resumed"})


async def is_paused(request: Request) -> JSONResponse:
    """GET /is_paused: {"is_paused": bool}."""
    return JSONResponse({"is_paused": await request.app.state.ctx.engine.is_paused()})


async def abort_requests(request: Request) -> JSONResponse:
    """POST /abort_requests {"request_ids": [...]}: ServingContext.abort_requests (no ids: all);
    {"status": "aborted", "aborted": number of engine requests ended}."""
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, AbortRequestsRequest)
    return JSONResponse({"status": "aborted", "aborted": await ctx.abort_requests(body.request_ids)})


async def reset_prefix_cache(request: Request) -> JSONResponse:
    """POST /reset_prefix_cache?reset_running_requests=false: AsyncLLM.reset_prefix_cache;
    {"success": true}. reset_external is accepted for vLLM's clients: there is no external
    (connector) cache to reset."""
    ctx = _ready_context(request)
    _query_bool(request, "reset_external", False)
    success = await ctx.engine.reset_prefix_cache(_query_bool(request, "reset_running_requests", False))
    return JSONResponse({"success": success})


SECRET_ENGINE_ARGS = ("hf_token",)


async def server_info(request: Request) -> JSONResponse:
    """GET /server_info?config_format=text|json (VLLM_SERVER_DEV_MODE): what this server runs with,
    in vLLM's three parts: `engine_args` (EngineArgs; the hub token left out; text: its repr),
    `env` (the VLLM_* and JPAGED_* variables set, none whose name holds KEY or TOKEN) and
    `system_env` (Python, jax and jaxlib versions, the devices, the CPU's vector features)."""
    ctx: ServingContext = request.app.state.ctx
    config_format = request.query_params.get("config_format", "text")
    if config_format not in ("text", "json"):
        raise APIError(f"config_format must be text or json, got {config_format!r}.", param="config_format")
    engine_args = dataclasses.replace(ctx.engine.engine_args, **{name: None for name in SECRET_ENGINE_ARGS})
    env = {name: value for name, value in os.environ.items()
           if name.startswith(("VLLM_", "JPAGED_")) and "KEY" not in name and "TOKEN" not in name}
    flags = cpu_flags()
    system_env = {"python": platform.python_version(), "platform": platform.platform(),
                  "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                  "devices": [str(device) for device in jax.devices()],
                  "cpu_features": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "neon", "sve")))}
    return JSONResponse({
        "engine_args": repr(engine_args) if config_format == "text" else _jsonable(dataclasses.asdict(engine_args)),
        "env": env, "system_env": system_env})


def _jsonable(value):
    """EngineArgs' values as JSON: containers walked, anything else not JSON-native as its str."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


async def start_profile(request: Request) -> Response:
    """POST /start_profile, optionally {"profile_prefix", "delay_iterations", "max_iterations"}:
    AsyncLLM.start_profile (400 while a trace runs); 200 with no body, as vLLM's."""
    ctx = _ready_context(request)
    has_body = request.headers.get("content-length", "0") != "0"
    body = await ctx.read_body(request, StartProfileRequest) if has_body else StartProfileRequest()
    try:
        await ctx.engine.start_profile(body.profile_prefix, body.delay_iterations, body.max_iterations)
    except ValueError as exc:
        raise APIError(f"start_profile: {exc}") from None
    return Response(status_code=200)


async def stop_profile(request: Request) -> Response:
    """POST /stop_profile: the trace is written; 200 with no body."""
    await _ready_context(request).engine.stop_profile()
    return Response(status_code=200)


PROFILE_ROUTES = [
    Route("/start_profile", start_profile, methods=["POST"]),
    Route("/stop_profile", stop_profile, methods=["POST"]),
]

DEV_ROUTES = [
    Route("/pause", pause, methods=["POST"]),
    Route("/resume", resume, methods=["POST"]),
    Route("/is_paused", is_paused, methods=["GET"]),
    Route("/abort_requests", abort_requests, methods=["POST"]),
    Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
    Route("/server_info", server_info, methods=["GET"]),
]
