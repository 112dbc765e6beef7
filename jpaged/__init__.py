"""jpaged: PagedAttention LLM inference and OpenAI-compatible serving on JAX/XLA.

    from jpaged import LLM, SamplingParams
    outputs = LLM().generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

The exports load lazily, so `import jpaged.engine` (the pure-Python host side) does not import JAX.
"""

import importlib

_EXPORTS = {
    "LLM": "jpaged.llm",
    "AsyncLLM": "jpaged.async_llm",
    "EngineArgs": "jpaged.config",
    "SamplingParams": "jpaged.sampling_params",
    "BeamSearchParams": "jpaged.beam_search",
    "StructuredOutputsParams": "jpaged.structured_output.params",
    "RequestOutput": "jpaged.outputs",
    "CompletionOutput": "jpaged.outputs",
    "LoRARequest": "jpaged.lora",
    "PoolingParams": "jpaged.pooling",
    "EmbeddingRequestOutput": "jpaged.outputs",
    "PoolingRequestOutput": "jpaged.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jpaged' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
