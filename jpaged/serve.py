"""`python -m jpaged.serve`: the OpenAI-compatible HTTP server (Starlette + uvicorn).

Loads the model and precompiles every step shape before listening, so the server is warm when
it logs its URL. SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests finish
for --graceful-shutdown-timeout seconds, then ends the rest with finish_reason "abort", and
exits 0.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys

import uvicorn
import yaml

from jpaged import multihost
from jpaged.async_llm import AsyncLLM
from jpaged.chat_content import CONTENT_FORMATS
from jpaged.config import EngineArgs, json_object
from jpaged.data_parallel import DataParallelAsyncLLM
from jpaged.generation_config import load_generation_defaults
from jpaged.llm_engine import LLMEngine
from jpaged.loaders import DEFAULT_MODEL
from serving.app import DEFAULT_MAX_HEADER_BYTES, CORSSettings, build_app, h11_buffer_bytes
from serving.context import DEFAULT_MAX_PROMPTS_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES, ServingContext
from serving.errors import APIError
from serving.response_store import DEFAULT_CAPACITY as RESPONSES_STORE_CAPACITY
from serving.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("jpaged.serve")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")  # --log-level, vLLM's


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jpaged.serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/responses, /v1/models, /tokenize, /detokenize, /health, "
                    "/ping, /invocations, /version, /metrics), and Anthropic's Messages API (/v1/messages).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="The model, as `vllm serve MODEL` takes it (same as --model).")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="vLLM's config file: a YAML mapping of flag names (without --) to values, e.g. "
                             "'port: 8001', 'max-model-len: 2048', 'enable-prefix-caching: false'; flags given on "
                             "the command line win over the file's.")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (0.0.0.0 for every interface).")
    server.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port).")
    server.add_argument("--uds", default=None, metavar="PATH",
                        help="Listen on a Unix domain socket at PATH instead of --host/--port "
                             "(HTTPS still with --ssl-keyfile/--ssl-certfile).")
    server.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                        help="One or more keys: require 'Authorization: Bearer KEY' (or Anthropic's "
                             "'x-api-key: KEY') with any of them on /v1, /invocations, /tokenize and /detokenize "
                             "(/health, /version and /metrics stay open). Default: the JPAGED_API_KEY environment "
                             "variable, else vLLM's VLLM_API_KEY; unset means no key.")
    server.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="Largest request body accepted; larger ones get 413.")
    server.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                        help="Largest total size of a request's headers; larger ones get 431.")
    server.add_argument("--max-prompts-per-request", type=int, default=DEFAULT_MAX_PROMPTS_PER_REQUEST,
                        help="Most prompts in one /v1/completions batch (`prompt` as a list) or /v1/embeddings "
                             "request (`input` as a list).")
    server.add_argument("--allowed-origins", type=_str_list, nargs="+", default=["*"],
                        help="CORS: origins browsers may call from (names, or one JSON list as vLLM takes).")
    server.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials.")
    server.add_argument("--allowed-methods", type=_str_list, nargs="+", default=["*"], help="CORS: allowed methods.")
    server.add_argument("--allowed-headers", type=_str_list, nargs="+", default=["*"], help="CORS: allowed headers.")
    server.add_argument("--ssl-keyfile", default=None, help="Serve HTTPS with this private key file.")
    server.add_argument("--ssl-certfile", default=None, help="Serve HTTPS with this certificate file.")
    server.add_argument("--ssl-ca-certs", default=None, help="CA certificates file (for client certificates).")
    server.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                        help="Whether client certificates are required: Python's ssl.VerifyMode (0 none, 1 optional, "
                             "2 required; with --ssl-ca-certs).")
    server.add_argument("--ssl-ciphers", default=None,
                        help="Cipher suites for HTTPS up to TLS 1.2, in OpenSSL's format (default: uvicorn's).")
    server.add_argument("--enable-scale-out", action="store_true",
                        help="Serve vLLM's token-in / token-out API: POST /inference/v1/generate (token ids and "
                             "SamplingParams fields in, token ids out), /inference/v1/abort_requests and "
                             "/v1/{chat/completions,completions,messages,responses}/render (a request as the "
                             "generate request it becomes); without it they answer 403, as in vLLM.")
    server.add_argument("--enable-log-requests", action="store_true",
                        help="Log one line per request: its id, prompt length and sampling parameters "
                             "(the prompt only with --max-log-len).")
    server.add_argument("--enable-log-outputs", action="store_true",
                        help="With --enable-log-requests, also log each finished request's outputs: text and "
                             "finish reason at INFO, token ids at DEBUG (vLLM's flag).")
    server.add_argument("--enable-log-deltas", action=argparse.BooleanOptionalAction, default=True,
                        help="With --enable-log-outputs, also log each piece of a streamed reply as it is sent "
                             "(vLLM's flag and default; --no-enable-log-deltas: only the finished reply).")
    server.add_argument("--disable-log-requests", action="store_true",
                        help="Older vLLM flag, kept so its command lines run: requests are not logged "
                             "unless --enable-log-requests.")
    server.add_argument("--max-log-len", type=_non_negative_int, default=None,
                        help="With --enable-log-requests, also log each prompt's first N characters and "
                             "token ids (default: no prompt text or ids in the log).")
    server.add_argument("--sse-keep-alive-interval", type=_non_negative_int, default=0, metavar="SECONDS",
                        help="Send an SSE comment line (': keep-alive') whenever a streamed /v1/chat/completions or "
                             "/v1/completions reply is idle this long (queued, prefilling, between tokens), so "
                             "proxies with read timeouts keep the connection; the stream then starts before the "
                             "first token, and an error of the request arrives as an error event. 0: never.")
    server.add_argument("--disable-access-log-for-endpoints", type=_comma_list, default=None,
                        metavar="PATH,PATH", help="No access-log lines for these paths, e.g. '/health,/metrics,/ping' "
                                                  "(their query strings aside).")
    server.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="No access-log line per HTTP request.")
    server.add_argument("--root-path", default=None,
                        help="The path prefix the server is reached under behind a path-routing proxy "
                             "(ASGI root_path).")
    server.add_argument("--response-role", default="assistant",
                        help="The role of chat replies when the request adds a generation prompt.")
    server.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="Name logprob tokens 'token_id:N' instead of their text (a request's "
                             "return_tokens_as_token_ids overrides it).")
    server.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="Report usage.prompt_tokens_details.cached_tokens (prompt tokens found in "
                             "the prefix cache) in completions and chat replies.")
    server.add_argument("--enable-force-include-usage", action="store_true",
                        help="End every stream with a usage chunk, as if each request set "
                             "stream_options.include_usage.")
    server.add_argument("--enable-request-id-headers", action="store_true",
                        help="Answer every request with an X-Request-Id header: the request's own, or a new id.")
    server.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                        help="Route GET /tokenizer_info: the tokenizer's settings (its init arguments), "
                             "class and chat template; off by default, as it shows the chat template. "
                             "Guarded by --api-key when one is set.")
    server.add_argument("--enable-server-load-tracking", action="store_true",
                        help="Count the completions, chat, responses, messages and invocations requests in "
                             "flight; GET /load reports the count as {\"server_load\": N} (0 without this flag).")
    server.add_argument("--default-chat-template-kwargs", type=json_object, default=None,
                        help="JSON object of chat template arguments for every request, e.g. "
                             "'{\"enable_thinking\": false}'; a request's chat_template_kwargs override them.")
    server.add_argument("--enable-update-weights-route", action="store_true",
                        help="Route POST /update_weights_from_disk {\"model_path\": ...}: load a checkpoint "
                             "of the same shapes and swap it in between steps (RL rollouts). Guarded by "
                             "--api-key when one is set.")
    server.add_argument("--chat-template-content-format", default="auto", choices=CONTENT_FORMATS,
                        help="How a chat message's content reaches the chat template: 'string' (one "
                             "string, text parts one per line), 'openai' (a list of "
                             "{\"type\": \"text\", \"text\": ...} parts) or 'auto' (whichever the "
                             "template expects: 'openai' when it loops over a message's content).")
    server.add_argument("--trust-request-chat-template", action="store_true",
                        help="Accept a `chat_template` field in chat requests (refused by default: "
                             "it runs client-supplied jinja and may name a file on the server).")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="Allow tool_choice 'auto' on chat completions: the model decides whether to "
                             "call tools, and its reply is parsed with --tool-call-parser.")
    server.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="How tool calls are found in a reply for tool_choice 'auto': 'hermes' "
                             "(<tool_call>{...}</tool_call>, as Qwen2.5/Qwen3 write them), "
                             "'llama3_json' (a bare {\"name\", \"parameters\"} object), 'pythonic' "
                             "(a Python list of calls, [f(a=1), g(b='x')], as Llama 3.2/4 pythonic "
                             "templates ask) or 'mistral' ([TOOL_CALLS] then the calls, as Mistral "
                             "models write them).")
    server.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                        help="With tool_choice 'none', render the chat template without the request's "
                             "tools (by default the model still sees them, as in vLLM).")
    server.add_argument("--enable-responses-store", action="store_true",
                        help=f"Keep the last {RESPONSES_STORE_CAPACITY} /v1/responses replies (those with "
                             "store true, the default) in memory for previous_response_id and "
                             "GET /v1/responses/{id}; "
                             "off by default, as in vLLM (VLLM_ENABLE_RESPONSES_API_STORE).")
    server.add_argument("--lora-modules", type=_lora_module, nargs="+", default=None,
                        help="LoRA adapters to serve as models of their own (with --enable-lora): name=path, or "
                             "vLLM's JSON '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'. "
                             "With VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, /v1/load_lora_adapter and "
                             "/v1/unload_lora_adapter add and remove them while serving.")
    server.add_argument("--graceful-shutdown-timeout", "--shutdown-timeout", type=float, default=30.0,
                        help="Seconds in-flight requests may run after SIGTERM before they are "
                             "ended with finish_reason 'abort' (--shutdown-timeout: vLLM's name for it).")
    server.add_argument("--log-level", type=str.upper, default="INFO", choices=LOG_LEVELS,
                        help="Log level of jpaged's own loggers (the engine's stats and the request logs; DEBUG adds "
                             "--enable-log-outputs' token ids), vLLM's flag; other libraries stay at INFO.")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="Log level of uvicorn (access log at 'info').")
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(max_num_batched_tokens=None)  # the server's chunk for the device, set by LLMEngine
    return parser


class _Server(uvicorn.Server):
    """uvicorn's server plus a readiness log line and an engine shutdown after the grace period."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM | DataParallelAsyncLLM, grace_s: float,
                 model_name: str):
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.model_name = model_name
        self.exit_requested = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        scheme = "https" if self.config.is_ssl else "http"
        if self.config.uds is not None:
            logger.info("jpaged is ready: serving %s on unix socket %s (%s; OpenAI API at /v1)",
                        self.model_name, self.config.uds, scheme)
        else:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            logger.info("jpaged is ready: serving %s on %s://%s:%d (OpenAI API at /v1)",
                        self.model_name, scheme, host, port)

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self.loop.call_soon_threadsafe(self.exit_requested.set)

    async def end_in_flight_requests(self) -> None:
        """After a signal, waits the grace period, then aborts whatever is still running."""
        await self.exit_requested.wait()
        logger.info("Shutting down: in-flight requests have %.0f s to finish.", self.grace_s)
        await asyncio.sleep(self.grace_s)
        logger.info("Grace period over: ending the remaining requests.")
        await self.engine.shutdown()


def _str_list(value: str) -> list[str]:
    """One flag value: a JSON list (vLLM's `--allowed-origins '["*"]'`) or a single name."""
    if value.startswith("["):
        parsed = json.loads(value)
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
        return parsed
    return [value]


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class _AccessLogFilter(logging.Filter):
    """Drops uvicorn's access-log records of the given paths (--disable-access-log-for-endpoints)."""

    def __init__(self, paths: list[str]):
        super().__init__()
        self.paths = set(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client address, method, path with query, HTTP version, status)
        args = record.args if isinstance(record.args, tuple) else ()
        return len(args) < 3 or str(args[2]).split("?", 1)[0] not in self.paths


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _lora_module(value: str) -> dict:
    """One --lora-modules value: name=path, or a JSON object with name, path and base_model_name."""
    if value.lstrip().startswith("{"):
        try:
            module = json.loads(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid JSON {value!r}: {exc}") from None
        if not isinstance(module, dict) or not isinstance(module.get("name"), str) or not isinstance(
                module.get("path"), str):
            raise argparse.ArgumentTypeError(f"expected {{\"name\": ..., \"path\": ...}}, got {value!r}")
        return {"name": module["name"], "path": module["path"], "base_model_name": module.get("base_model_name")}
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path or a JSON object, got {value!r}")
    return {"name": name, "path": path, "base_model_name": None}


def _flatten(values: list) -> list[str]:
    """nargs="+" of `_str_list` values (lists) or the plain default (strings) as one list."""
    return [v for group in values for v in ([group] if isinstance(group, str) else group)]


async def _serve(args: argparse.Namespace, engine_args: EngineArgs, api_keys: list[str]) -> None:
    engine_cls = DataParallelAsyncLLM if engine_args.data_parallel_size > 1 else AsyncLLM
    engine = engine_cls.from_engine_args(engine_args)
    if engine_args.enable_prefix_caching:
        # Cached blocks are reused last, so the server walks its whole pool: take the memory now,
        # in the background (seconds on a VM), not as page faults inside steps (`LLM` keeps the
        # pool lazy: an offline run holds only what it uses; without caching, freed blocks are
        # reused first and the touched part stays the working set). Contents never change, so
        # steps may run meanwhile; a pool allocated again by wake_up is populated too.
        for replica in engine.replicas if isinstance(engine, DataParallelAsyncLLM) else [engine]:
            replica.engine.populate_kv_cache()
    names = engine_args.served_model_name or [engine_args.model or DEFAULT_MODEL]
    ctx = ServingContext(engine, served_model_name=names,
                         trust_request_chat_template=args.trust_request_chat_template,
                         max_request_bytes=args.max_request_bytes,
                         max_prompts_per_request=args.max_prompts_per_request,
                         generation_defaults=load_generation_defaults(engine_args.generation_config,
                                                                      engine.model_path,
                                                                      engine_args.override_generation_config),
                         log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
                         log_outputs=args.enable_log_outputs, log_deltas=args.enable_log_deltas,
                         enable_auto_tool_choice=args.enable_auto_tool_choice,
                         tool_call_parser=args.tool_call_parser,
                         enable_responses_store=args.enable_responses_store,
                         reasoning_parser=engine_args.reasoning_parser, response_role=args.response_role,
                         return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                         enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                         enable_force_include_usage=args.enable_force_include_usage,
                         default_chat_template_kwargs=args.default_chat_template_kwargs,
                         exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                         chat_template_content_format=args.chat_template_content_format,
                         sse_keep_alive_interval=args.sse_keep_alive_interval)
    for module in args.lora_modules or ():
        try:
            await ctx.load_lora_adapter(module["name"], module["path"], module["base_model_name"])
        except APIError as exc:
            await engine.shutdown()
            raise SystemExit(f"--lora-modules {module['name']}: {exc.message}") from None
    cors = CORSSettings(allowed_origins=_flatten(args.allowed_origins), allow_credentials=args.allow_credentials,
                        allowed_methods=_flatten(args.allowed_methods), allowed_headers=_flatten(args.allowed_headers))
    lora_updating = _env_flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    if lora_updating:
        logger.warning("LoRA adapters may be loaded and unloaded over HTTP (VLLM_ALLOW_RUNTIME_LORA_UPDATING): "
                       "meant for development only.")
    server_dev_mode = _env_flag("VLLM_SERVER_DEV_MODE")
    if server_dev_mode:
        logger.warning("Development routes are on (VLLM_SERVER_DEV_MODE): /pause, /resume, /is_paused, "
                       "/abort_requests, /reset_prefix_cache, /server_info. Do not expose this server to untrusted "
                       "clients.")
    app = build_app(ctx, api_keys=api_keys, cors=cors, enable_update_weights_route=args.enable_update_weights_route,
                    enable_lora_updating=lora_updating, max_header_bytes=args.max_header_bytes,
                    enable_request_id_headers=args.enable_request_id_headers,
                    enable_server_load_tracking=args.enable_server_load_tracking, root_path=args.root_path or "",
                    enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
                    enable_sleep_mode=args.enable_sleep_mode, server_dev_mode=server_dev_mode,
                    enable_profiler=engine_args.profiler_config is not None, enable_scale_out=args.enable_scale_out)
    config = uvicorn.Config(app, host=args.host, port=args.port, uds=args.uds, log_level=args.uvicorn_log_level,
                            lifespan="off", h11_max_incomplete_event_size=h11_buffer_bytes(args.max_header_bytes),
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout + 5,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                            **({} if args.ssl_ciphers is None else {"ssl_ciphers": args.ssl_ciphers}),
                            access_log=not args.disable_uvicorn_access_log)
    if args.disable_access_log_for_endpoints:  # after uvicorn.Config, which configures its loggers
        logging.getLogger("uvicorn.access").addFilter(_AccessLogFilter(args.disable_access_log_for_endpoints))
    server = _Server(config, engine, args.graceful_shutdown_timeout, names[0])
    ender = asyncio.create_task(server.end_in_flight_requests())
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; these
    # handlers make that a no-op, so the process exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        await server.serve()
    finally:
        ender.cancel()
        await engine.shutdown()
        multihost.stop_followers()  # multi-host: releases the other hosts (nothing on one host)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, EngineArgs]:
    """The server's flags and the EngineArgs; exits 2 (argparse's way) naming a bad flag."""
    parser = make_parser()
    args = parser.parse_args(_with_config_file(parser, sys.argv[1:] if argv is None else list(argv)))
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the positional MODEL ({args.model_tag}) and --model ({args.model}) differ; give one.")
        args.model = args.model_tag
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        parser.error("--ssl-keyfile and --ssl-certfile go together: give both or neither.")
    if args.uds is not None:
        _check_uds(parser, args.uds)
    if args.enable_log_outputs and not args.enable_log_requests:
        parser.error("--enable-log-outputs requires --enable-log-requests.")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser.")
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora.")
    try:
        return args, EngineArgs.from_cli_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def _with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with vLLM's `--config FILE.yaml` replaced by the file's flags, put first so that the
    command line's win: `key: value` -> --key value, true -> --key, false -> --no-key (where the
    flag has one), a list -> --key item ..., a mapping -> --key '<its JSON>'."""
    at = next((i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")), None)
    if at is None:
        return argv
    inline = argv[at].startswith("--config=")
    path = argv[at].split("=", 1)[1] if inline else (argv[at + 1] if at + 1 < len(argv) else None)
    rest = argv[:at] + argv[at + (1 if inline else 2):]
    if not path or not path.endswith((".yaml", ".yml")):
        parser.error(f"--config needs a .yaml or .yml file, got {path!r}.")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {path}: {exc}")
    if not isinstance(config, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(config).__name__}.")
    flags = []
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            negative = "--no-" + flag[2:]
            flags += [flag] if value else [negative] if negative in parser._option_string_actions else []
        elif isinstance(value, list):
            flags += [flag, *map(str, value)] if value else []
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags + rest


# sun_path holds 108 bytes on Linux, the last a NUL
MAX_UDS_PATH_BYTES = 107


def _check_uds(parser: argparse.ArgumentParser, path: str) -> None:
    """Refuses an --uds path the socket cannot bind to, before the model loads."""
    if len(os.fsencode(path)) > MAX_UDS_PATH_BYTES:
        parser.error(f"--uds {path!r} is {len(os.fsencode(path))} bytes long; a Unix socket path holds "
                     f"at most {MAX_UDS_PATH_BYTES}.")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        parser.error(f"--uds {path!r}: the folder {folder!r} does not exist.")


def configure_logging(level: str) -> None:
    """Logs at INFO to stderr, jpaged's loggers (jpaged.*, serving.*) at `level` (LOG_LEVELS)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("jpaged", "serving"):
        logging.getLogger(name).setLevel(level)


def _env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to 1 or true (vLLM's switches)."""
    return os.environ.get(name, "0").strip().lower() in ("1", "true")


def resolve_api_keys(flag_keys: list[str] | None, environ) -> list[str]:
    """The server's API keys: --api-key's, else $JPAGED_API_KEY, else vLLM's $VLLM_API_KEY; empty
    keys are dropped (no key: the routes are open)."""
    keys = flag_keys or [environ.get("JPAGED_API_KEY") or environ.get("VLLM_API_KEY")]
    return [key for key in keys if key]


def main(argv: list[str] | None = None) -> int:
    args, engine_args = parse_args(argv)
    configure_logging(args.log_level)
    api_keys = resolve_api_keys(args.api_key, os.environ)
    if engine_args.host_id != 0:  # multi-host: run host 0's steps; host 0 serves
        LLMEngine(engine_args).follow()
        return 0
    asyncio.run(_serve(args, engine_args, api_keys))
    # Interpreter teardown resets Python-level signal handlers to the default, so a second
    # SIGTERM arriving now (an impatient supervisor) would end the process with -15; the server
    # has already stopped, so ignore it (SIG_IGN survives teardown).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
