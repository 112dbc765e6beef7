"""LLM: offline batched generation in-process, vLLM's `LLM` class."""

import dataclasses
import logging

from tqdm.auto import tqdm

from jpaged.config import EngineArgs
from jpaged.llm_engine import LLMEngine
from jpaged.outputs import RequestOutput
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
        self.llm_engine = LLMEngine(EngineArgs(model=model, **engine_args), flax_model=flax_model, params=params)
        self._next_id = 0
        if self.llm_engine.engine_args.host_id != 0:  # multi-host: run host 0's steps until its shutdown()
            self.llm_engine.follow()

    def shutdown(self) -> None:
        """Multi-host, on host 0: releases the other hosts (their LLM() returns). Nothing on one host."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def update_weights(self, params) -> None:
        """Replaces the weights with a params pytree of the same structure, shapes and dtypes
        (e.g. from a JAX training loop); nothing recompiles."""
        self.llm_engine.update_weights(params)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Completes every prompt; returns one finished RequestOutput per prompt, in order.

        prompts: a str, a list of str, a list of token ids, a list of token-id lists, a
        {"prompt": ...} / {"prompt_token_ids": ...} dict or a list of them.
        sampling_params: one for all prompts or one per prompt (default SamplingParams()).
        """
        if self.llm_engine.engine_args.host_id != 0:
            raise RuntimeError("generate() runs on host 0 of a multi-host engine; this is host "
                               f"{self.llm_engine.engine_args.host_id}.")
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                             f"pass one, or one per prompt.")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(self._next_id)
                self._next_id += 1
                engine.add_request(request_id, prompt, params)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, unit="prompt") as bar:
            while len(finished) < len(ids):
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in ids]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.llm_engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template)
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)


def _show_info_logs() -> None:
    """Prints jpaged's INFO logs (KV sizing, compile time, stats) unless the application set up logging."""
    package_logger = logging.getLogger("jpaged")
    if not logging.getLogger().handlers and not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt of token ids
    return prompts
