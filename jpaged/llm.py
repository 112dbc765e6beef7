"""LLM: offline batched generation in-process, vLLM's `LLM` class.

With data_parallel_size > 1 the prompts are spread over the replicas of a DataParallelAsyncLLM
(each steps on its own thread); otherwise one LLMEngine is stepped on the caller's thread.
"""

import asyncio
import concurrent.futures
import dataclasses
import logging

from tqdm.auto import tqdm

from jpaged.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from jpaged.config import EngineArgs
from jpaged.data_parallel import DataParallelAsyncLLM
from jpaged.generation_config import load_generation_defaults
from jpaged.llm_engine import LLMEngine
from jpaged.lora import LoRARequest
from jpaged.outputs import EmbeddingRequestOutput, RequestOutput
from jpaged.pooling import PoolingParams
from jpaged.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """`LLM(model, **engine_args)`: loads the model and precompiles at construction.

    Keyword arguments are EngineArgs fields (max_model_len=..., num_gpu_blocks_override=...).
    flax_model, params: serve your own Flax model of the Llama family with its params pytree
    (docs/models.md); `model` then names where the tokenizer comes from.
    """

    def __init__(self, model: str | None = None, *, flax_model=None, params=None, **engine_args):
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(engine_args) - names)
        if unknown:
            raise TypeError(f"LLM() got unknown engine arguments {unknown}; valid ones are the EngineArgs fields.")
        _show_info_logs()
        args = EngineArgs(model=model, **engine_args)
        if flax_model is not None and args.data_parallel_size > 1:
            raise ValueError("flax_model with --data-parallel-size > 1 is not supported; serve it with one replica.")
        self.host_id = args.host_id
        # Exactly one of the two is set:
        self.llm_engine: LLMEngine | None = None if args.data_parallel_size > 1 else LLMEngine(
            args, flax_model=flax_model, params=params)
        # LLM queues every prompt it is given: the servers' queue limits do not apply.
        self.data_parallel = None if self.llm_engine is not None else DataParallelAsyncLLM.from_engine_args(
            dataclasses.replace(args, max_num_queued_reqs=None, max_num_queued_tokens=None))
        self._next_id = 0
        self._default_sampling_params: dict | None = None  # get_default_sampling_params' fields, once read
        self._enqueued: list[str] = []  # ids enqueue() returned that wait_for_completion() has not yet
        self._finished_enqueued: dict[str, RequestOutput] = {}  # those a generate() call ran to the end
        self._pending_data_parallel: list[tuple] = []  # enqueued requests a data-parallel front has not started
        if self.host_id != 0:  # multi-host: run host 0's steps until its shutdown()
            self.llm_engine.follow()

    def shutdown(self) -> None:
        """Multi-host, on host 0: releases the other hosts (their LLM() returns). Nothing on one host."""
        if self.llm_engine is not None:
            self.llm_engine.shutdown()

    def get_tokenizer(self):
        return (self.llm_engine or self.data_parallel).tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what generate and chat sample with when given no SamplingParams: the sampling
        fields of the model's generation_config.json (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens as max_tokens; engine args generation_config and
        override_generation_config, as the server applies them), else SamplingParams()'s."""
        if self._default_sampling_params is None:
            engine = self.llm_engine or self.data_parallel
            args = engine.engine_args
            self._default_sampling_params = load_generation_defaults(args.generation_config, engine.model_path,
                                                                     args.override_generation_config)
        return SamplingParams(**self._default_sampling_params)

    def update_weights(self, params) -> None:
        """Replaces the weights with a params pytree of the same structure, shapes and dtypes
        (e.g. from a JAX training loop); nothing recompiles."""
        if self.llm_engine is not None:
            self.llm_engine.update_weights(params)
        else:
            _run_to_completion(self.data_parallel.update_weights(params))

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Later prompts find no cached prefix (e.g. between a benchmark's passes); see
        LLMEngine.reset_prefix_cache. True (it does not fail while blocks are in use, unlike vLLM's)."""
        if self.llm_engine is not None:
            return self.llm_engine.reset_prefix_cache(reset_running_requests)
        return _run_to_completion(self.data_parallel.reset_prefix_cache(reset_running_requests))

    def start_profile(self, profile_prefix: str | None = None, *, delay_iterations: int | None = None,
                      max_iterations: int | None = None) -> None:
        """vLLM's: a JAX trace of the engine's next steps (needs profiler_config; see
        LLMEngine.start_profile), until stop_profile() or max_iterations steps."""
        if self.llm_engine is not None:
            self.llm_engine.start_profile(profile_prefix, delay_iterations, max_iterations)
        else:
            _run_to_completion(self.data_parallel.start_profile(profile_prefix, delay_iterations, max_iterations))

    def stop_profile(self) -> None:
        if self.llm_engine is not None:
            self.llm_engine.stop_profile()
        else:
            _run_to_completion(self.data_parallel.stop_profile())

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's sleep mode (needs enable_sleep_mode=True): release the KV cache's memory (level 1,
        and the weights' device memory on a GPU, kept on the host) or also drop the weights (level
        2; update_weights gives new ones); level 0 only pauses. See LLMEngine.sleep."""
        if self.llm_engine is not None:
            self.llm_engine.sleep(level, mode)
        else:
            _run_to_completion(self.data_parallel.sleep(level, mode))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Takes back what sleep released ("weights", "kv_cache", "scheduling"; None: all); whether
        the engine is fully awake (generate needs that)."""
        if self.llm_engine is not None:
            return self.llm_engine.wake_up(tags)
        return _run_to_completion(self.data_parallel.wake_up(tags))

    def is_sleeping(self) -> bool:
        engines = [self.llm_engine] if self.llm_engine is not None else [r.engine for r in self.data_parallel.replicas]
        return any(engine.is_sleeping() for engine in engines)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm=True,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                 priority: int | list[int] | None = None) -> list[RequestOutput]:
        """Completes every prompt; returns one finished RequestOutput per prompt, in order.

        prompts: a str, a list of str, a list of token ids, a list of token-id lists, a
        {"prompt": ...} / {"prompt_token_ids": ...} dict (with an optional "cache_salt": prompts
        share prefix-cache blocks only with prompts of the same salt) or a list of them.
        sampling_params: one for all prompts or one per prompt (default: get_default_sampling_params()).
        use_tqdm: show a progress bar (True), none (False), or vLLM's form: the tqdm class to use.
        lora_request: a LoRA adapter for all prompts or one (or None) per prompt (needs enable_lora=True).
        priority: an int for all prompts or one per prompt, lower first (needs
        scheduling_policy="priority"); default 0.
        """
        self._check_can_run("generate")
        batch = self._batch(prompts, sampling_params, lora_request, priority)
        ids = [self._new_request_id() for _ in batch]
        if self.data_parallel is not None:
            return self._run_data_parallel(batch, ids, use_tqdm)
        self._add(batch, ids)
        return self._run(ids, use_tqdm)

    def embed(self, prompts, pooling_params: PoolingParams | list[PoolingParams] | None = None, use_tqdm=True,
              lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[EmbeddingRequestOutput]:
        """vLLM's: one embedding per prompt, in order (`outputs[i].outputs.embedding`, a list of
        floats), from an engine that runs runner="pooling" (docs/embeddings.md). prompts as
        generate takes them; pooling_params: one for all prompts or one per prompt (default
        PoolingParams()). RuntimeError when a prompt's step failed."""
        self._check_can_run("embed")
        if self.llm_engine is None or self.llm_engine.pooler_config is None:
            raise ValueError("LLM.embed() needs a pooling model: construct the LLM with runner='pooling' (one engine, "
                             "no data_parallel_size).")
        batch = self._batch(prompts, pooling_params or PoolingParams(), lora_request, None)
        ids = [self._new_request_id() for _ in batch]
        self._add(batch, ids)
        outputs = self._run(ids, use_tqdm)
        for output in outputs:
            if output.outputs is None:
                raise RuntimeError(f"request {output.request_id} was not embedded: {output.error or 'aborted'}")
        return [EmbeddingRequestOutput.from_base(output) for output in outputs]

    def enqueue(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                priority: int | list[int] | None = None, use_tqdm: bool = True) -> list[str]:
        """vLLM's: queues the prompts (as generate takes them, checked now) without running them
        and returns their request ids; wait_for_completion() runs them. A generate call meanwhile
        runs them too (one engine; a data-parallel front starts them at the wait) but returns only
        its own outputs. Allowed while scheduling is paused (e.g.
        sleep(level=0)), so a whole batch is queued before the first step. use_tqdm: vLLM's bar
        over the adding, accepted for its signature (adding is immediate here)."""
        self._check_host("enqueue")
        batch = self._batch(prompts, sampling_params, lora_request, priority)
        ids = [self._new_request_id() for _ in batch]
        if self.data_parallel is not None:  # the front runs requests as tasks: they start in wait_for_completion
            tokenizer = self.get_tokenizer()
            for prompt, params, _, _ in batch:
                self.data_parallel.validator.validate(tokenizer.prompt_and_ids(prompt)[1], params)
            self._pending_data_parallel += batch
        else:
            self._add(batch, ids)
        self._enqueued += ids
        return ids

    def wait_for_completion(self, use_tqdm: bool = True) -> list[RequestOutput]:
        """vLLM's: runs every enqueued request to its end; their final outputs, in enqueue order."""
        self._check_can_run("wait_for_completion")
        ids, self._enqueued = self._enqueued, []
        if self.data_parallel is not None:
            batch, self._pending_data_parallel = self._pending_data_parallel, []
            return self._run_data_parallel(batch, ids, use_tqdm)
        return self._run(ids, use_tqdm)

    def _check_host(self, method: str) -> None:
        if self.host_id != 0:
            raise RuntimeError(f"{method}() runs on host 0 of a multi-host engine; this is host {self.host_id}.")

    def _check_can_run(self, method: str) -> None:
        self._check_host(method)
        if self.is_sleeping():
            raise RuntimeError(f"the engine is asleep: call wake_up() before {method}().")

    def _batch(self, prompts, sampling_params, lora_request, priority) -> list[tuple]:
        """generate's (or embed's) arguments as one (prompt, SamplingParams or PoolingParams,
        LoRARequest | None, priority) per prompt."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, (SamplingParams, PoolingParams)):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                             f"pass one, or one per prompt.")
        sampling_params = [params.clone() for params in sampling_params]
        for params in sampling_params:
            if isinstance(params, SamplingParams):
                params.output_kind = RequestOutputKind.FINAL_ONLY
        if not isinstance(lora_request, list):
            lora_request = [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise ValueError(f"got {len(lora_request)} lora_request entries for {len(prompts)} prompts; "
                             f"pass one, or one per prompt.")
        if priority is None or isinstance(priority, int):
            priority = [priority or 0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priority entries for {len(prompts)} prompts; "
                             f"pass one, or one per prompt.")
        return list(zip(prompts, sampling_params, lora_request, priority))

    def _add(self, batch: list[tuple], ids: list[str]) -> None:
        """Adds the batch's requests to the engine; the first invalid one aborts those added before it."""
        added = []
        try:
            for (prompt, params, adapter, priority), request_id in zip(batch, ids):
                self.llm_engine.add_request(request_id, prompt, params, lora_request=adapter, priority=priority)
                added.append(request_id)
        except ValueError:
            for request_id in added:
                self.llm_engine.abort_request(request_id)
            raise

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Steps the engine until the requests `ids` finished; their final outputs in that order.
        Enqueued requests that finish meanwhile keep their outputs for wait_for_completion."""
        wanted = set(ids)
        finished = {request_id: self._finished_enqueued.pop(request_id) for request_id in ids
                    if request_id in self._finished_enqueued}
        with _Progress(use_tqdm, total=len(ids), initial=len(finished)) as progress:
            while len(finished) < len(ids):
                for output in self.llm_engine.step():
                    if not output.finished:
                        continue
                    if output.request_id in wanted:
                        finished[output.request_id] = output
                        progress.finished(output)
                    else:
                        self._finished_enqueued[output.request_id] = output
                if len(finished) < len(ids) and not self.llm_engine.has_unfinished_requests():
                    missing = [request_id for request_id in ids if request_id not in finished]
                    raise RuntimeError(f"requests {missing[:8]} left the engine without a final output.")
        return [finished[request_id] for request_id in ids]

    def beam_search(self, prompts, params: BeamSearchParams, lora_request: LoRARequest | None = None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's beam search (jpaged/beam_search.py): one BeamSearchOutput per prompt, in order,
        holding its best `params.beam_width` sequences, best first.

        prompts: as `generate` takes them. As in vLLM, a sequence's `tokens` and `text` start with
        the prompt's, and a sequence that ended on EOS keeps it in `tokens`. concurrency_limit:
        the most prompts searched at once (default: all); each step runs every live beam of
        those prompts as one `generate` batch. lora_request: the LoRA adapter of every beam.
        """
        tokenizer = self.get_tokenizer()
        validator = (self.llm_engine or self.data_parallel).validator
        searches = []
        for prompt in _as_prompt_list(prompts):
            prompt_ids = tokenizer.prompt_and_ids(prompt)[1]
            validator.validate_beam_search(prompt_ids, params.beam_width, params.max_tokens)
            searches.append(BeamSearch(prompt_ids, params, tokenizer.eos_token_ids))
        limit = concurrency_limit or max(len(searches), 1)
        step_params = params.step_params()
        for start in range(0, len(searches), limit):
            batch = searches[start:start + limit]
            for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm, unit="token"):
                running = [search for search in batch if not search.done]
                if not running:
                    break
                beams = [{"prompt_token_ids": beam.tokens} for search in running for beam in search.live]
                outputs = self.generate(beams, step_params, use_tqdm=False, lora_request=lora_request)
                for search in running:
                    num_live = len(search.live)
                    search.advance(outputs[:num_live])
                    outputs = outputs[num_live:]
        results = []
        for search in searches:
            best = search.best()
            for beam in best:
                beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=params.skip_special_tokens)
            results.append(BeamSearchOutput(best))
        return results

    def _run_data_parallel(self, batch: list[tuple], ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        with _Progress(use_tqdm, total=len(batch)) as progress:
            return _run_to_completion(self._generate_data_parallel(batch, ids, progress))

    async def _generate_data_parallel(self, batch: list[tuple], ids: list[str],
                                      progress: "_Progress") -> list[RequestOutput]:
        """Runs every request through the data-parallel front at once; the first error aborts the rest."""

        async def run(prompt, params: SamplingParams, adapter, priority: int, request_id: str) -> RequestOutput:
            async for output in self.data_parallel.generate(prompt, params, request_id, lora_request=adapter,
                                                            priority=priority):
                final = output
            progress.finished(final)
            return final

        tasks = [asyncio.create_task(run(*request, request_id)) for request, request_id in zip(batch, ids)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()  # closes its stream, which aborts the request
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id - 1)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None,
             chat_template_content_format: str = "auto") -> list[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"} dicts) or a list of them.

        As vLLM's: content is a string or a list of {"type": "text", "text": ...} parts;
        chat_template_content_format says how it reaches the template: "string" (one string, the
        parts one per line), "openai" (a list of text parts) or "auto" (what the template expects).
        continue_final_message leaves the last message open for the model to continue (not with
        add_generation_prompt); tools and chat_template_kwargs go to the chat template;
        lora_request as for generate.
        """
        prompts = self._chat_prompts(messages, chat_template, add_generation_prompt, continue_final_message, tools,
                                     chat_template_kwargs, chat_template_content_format)
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def enqueue_chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                     use_tqdm: bool = True, lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                     priority: int | list[int] | None = None, chat_template: str | None = None,
                     chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
                     continue_final_message: bool = False, tools: list[dict] | None = None,
                     chat_template_kwargs: dict | None = None) -> list[str]:
        """vLLM's: chat's conversations rendered as chat renders them, then enqueue()d; their
        request ids. wait_for_completion() runs them."""
        prompts = self._chat_prompts(messages, chat_template, add_generation_prompt, continue_final_message, tools,
                                     chat_template_kwargs, chat_template_content_format)
        return self.enqueue(prompts, sampling_params, lora_request, priority, use_tqdm)

    def _chat_prompts(self, messages, chat_template, add_generation_prompt, continue_final_message, tools,
                      chat_template_kwargs, chat_template_content_format) -> list[dict]:
        """One {"prompt": text, "prompt_token_ids": ids} per conversation, through the chat template."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        kwargs = dict(chat_template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        if tools is not None:
            kwargs["tools"] = tools
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template,
                                                 content_format=chat_template_content_format, **kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return prompts


class _Progress:
    """generate's bar over finished prompts, with vLLM's estimate of input and output tokens/s over
    the finished ones; use_tqdm: a bool, or (as vLLM takes it) a tqdm-like class."""

    def __init__(self, use_tqdm, total: int, initial: int = 0):
        bar_class = use_tqdm if callable(use_tqdm) else tqdm
        self.bar = bar_class(total=total, initial=initial, desc="Processed prompts", disable=not use_tqdm,
                             unit="prompt")
        self.prompt_tokens = self.output_tokens = 0

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()

    def finished(self, output) -> None:
        """output: a finished RequestOutput or PoolingRequestOutput."""
        self.prompt_tokens += len(output.prompt_token_ids or ())
        if isinstance(output, RequestOutput):
            self.output_tokens += sum(len(completion.token_ids) for completion in output.outputs)
        elapsed = 0.0 if self.bar.disable else self.bar.format_dict["elapsed"]
        if elapsed > 0:
            self.bar.set_postfix_str(f"est. speed input: {self.prompt_tokens / elapsed:.2f} toks/s, "
                                     f"output: {self.output_tokens / elapsed:.2f} toks/s", refresh=False)
        self.bar.update(1)


def _show_info_logs() -> None:
    """Prints jpaged's INFO logs (KV sizing, compile time, stats) unless the application set up logging."""
    package_logger = logging.getLogger("jpaged")
    if not logging.getLogger().handlers and not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)


def _run_to_completion(coroutine):
    """Runs a coroutine on a fresh event loop in a worker thread and returns its result (so LLM
    works from code that already runs an event loop, e.g. a notebook)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt of token ids
    return prompts
