"""`python -m jpaged.serve`: the OpenAI-compatible HTTP server (Starlette + uvicorn).

Loads the model and precompiles every step shape before listening, so the server is warm when
it logs its URL. SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests finish
for --graceful-shutdown-timeout seconds, then ends the rest with finish_reason "abort", and
exits 0.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvicorn

from jpaged.async_llm import AsyncLLM
from jpaged.config import EngineArgs
from jpaged.loaders import DEFAULT_MODEL
from serving.app import build_app
from serving.context import DEFAULT_MAX_REQUEST_BYTES, ServingContext
from serving.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("jpaged.serve")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jpaged.serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, "
                    "/version, /metrics).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (0.0.0.0 for every interface).")
    server.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port).")
    server.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer KEY' on /v1 routes. Default: the "
                             "JPAGED_API_KEY environment variable; unset means no key.")
    server.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="Largest request body accepted; larger ones get 413.")
    server.add_argument("--trust-request-chat-template", action="store_true",
                        help="Accept a `chat_template` field in chat requests (refused by default: "
                             "it runs client-supplied jinja and may name a file on the server).")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="Allow tool_choice 'auto' on chat completions: the model decides whether to "
                             "call tools, and its reply is parsed with --tool-call-parser.")
    server.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="How tool calls are found in a reply for tool_choice 'auto': 'hermes' "
                             "(<tool_call>{...}</tool_call>, as Qwen2.5/Qwen3 write them) or "
                             "'llama3_json' (a bare {\"name\", \"parameters\"} object).")
    server.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                        help="Seconds in-flight requests may run after SIGTERM before they are "
                             "ended with finish_reason 'abort'.")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="Log level of uvicorn (access log at 'info').")
    EngineArgs.add_cli_args(parser)
    return parser


class _Server(uvicorn.Server):
    """uvicorn's server plus a readiness log line and an engine shutdown after the grace period."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, grace_s: float, model_name: str):
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.model_name = model_name
        self.exit_requested = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            logger.info("jpaged is ready: serving %s on http://%s:%d (OpenAI API at /v1)",
                        self.model_name, host, port)

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


async def _serve(args: argparse.Namespace, engine_args: EngineArgs, api_key: str | None) -> None:
    engine = AsyncLLM.from_engine_args(engine_args)
    model_name = engine_args.served_model_name or engine_args.model or DEFAULT_MODEL
    ctx = ServingContext(engine, served_model_name=model_name,
                         trust_request_chat_template=args.trust_request_chat_template,
                         max_request_bytes=args.max_request_bytes,
                         enable_auto_tool_choice=args.enable_auto_tool_choice,
                         tool_call_parser=args.tool_call_parser)
    app = build_app(ctx, api_key=api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            lifespan="off", timeout_graceful_shutdown=args.graceful_shutdown_timeout + 5)
    server = _Server(config, engine, args.graceful_shutdown_timeout, model_name)
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


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_args = EngineArgs.from_cli_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser.")
    api_key = args.api_key or os.environ.get("JPAGED_API_KEY") or None
    asyncio.run(_serve(args, engine_args, api_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
