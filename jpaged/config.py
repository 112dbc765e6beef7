"""EngineArgs: the single source of engine flag names, defaults and help text.

`python -m jpaged.serve` and `scripts/benchmark_throughput.py` build their flags from it with
`EngineArgs.add_cli_args(parser)`; `LLM(model, **kwargs)` takes the same names as keywords.
"""

import argparse
import dataclasses
import json
import os
import re

from jpaged.cpu_features import has_amx
from jpaged.pooling import RUNNERS, resolve_pooler_config
from jpaged.reasoning import REASONING_MARKERS, check_reasoning_config

# On CPU the KV pool lives in host memory; this is its budget when --kv-cache-memory is unset.
DEFAULT_CPU_KV_CACHE_GIB = 4.0
# On CPU the host's work between decode steps is ~10% of a small model's step (docs/performance.md);
# four steps per round take most of it away without holding new requests back long.
DEFAULT_CPU_SCHEDULER_STEPS = 4
# The prefill chunk (--max-num-batched-tokens): 512 for offline throughput. The server leaves the
# flag unset (None), which on CPU means a chunk that splits the server's latency between TTFT and
# TPOT by what the CPU's prefill costs against its decode (docs/performance.md, run 25): 384 with
# AMX, where a burst of arrivals gets its first tokens sooner (mean TTFT -13 to -19 % for +2-3 %
# TPOT), 768 without it, where TTFT has room and decoding requests wait through fewer mixed steps
# (a Zen 4: TPOT -5 to -12 %, TTFT +4 to +9 %). vLLM too gives its server its own CPU chunk (2,048).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
SERVER_CPU_MAX_NUM_BATCHED_TOKENS = 768
SERVER_CPU_AMX_MAX_NUM_BATCHED_TOKENS = 384
# --kv-cache-dtype values, vLLM's names (fp8 is fp8_e4m3); jpaged/kv_quantization.py maps them to page dtypes.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8", "fp8", "fp8_e4m3", "fp8_e5m2")
# --logprobs-mode values, vLLM's names (jpaged/sampler.py); the first is the default.
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
# --max-lora-rank values (vLLM's).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# --scheduling-policy values (vLLM's); the first is the default.
SCHEDULING_POLICIES = ("fcfs", "priority")
# --tokenizer-mode values: vLLM's names for the Hugging Face tokenizer ("auto" picks it for every
# model jpaged loads; vLLM's other modes are Mistral's and DeepSeek's own tokenizer libraries).
TOKENIZER_MODES = ("auto", "hf")
_DECIMAL_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_int(value: str) -> int:
    """A flag's integer as vLLM writes it: 1000, '1k' (10^3), '25.6k', '1K' (2^10), '4G' (2^30)."""
    value = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if match is None:
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer such as 4294967296, 4G or 4.5g, got {value!r}")
    number, suffix = match.groups()
    if suffix in _DECIMAL_SUFFIXES:
        return int(float(number) * _DECIMAL_SUFFIXES[suffix])
    if "." in number:
        raise argparse.ArgumentTypeError(f"decimals are not allowed with the binary suffix {suffix} "
                                         f"(did you mean {number}{suffix.lower()}?)")
    return int(number) * _BINARY_SUFFIXES[suffix]


def json_object(value: str) -> dict:
    """A flag's JSON object ('{"key": value}')."""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {value!r}: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _field(default, help: str, choices=None, type=None, nargs=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "type": type, "nargs": nargs})


@dataclasses.dataclass
class EngineArgs:
    """Every engine setting, with vLLM's names and (where they make sense on CPU) its defaults."""

    model: str | None = _field(
        None, "Model: a .gguf file, an HF folder, an orbax checkpoint folder or a hub id. "
        "Without a value, or 'smollm2-135m-instruct': the bundled SmolLM2-135M-Instruct (Q4_1 GGUF).",
        type=str, nargs="?")
    tokenizer: str | None = _field(None, "Tokenizer folder or hub id (default: the model's).", type=str)
    tokenizer_mode: str = _field(
        TOKENIZER_MODES[0], "Tokenizer implementation (vLLM's names): auto and hf both use the Hugging Face "
        "tokenizer (fast where the folder has tokenizer.json).", choices=list(TOKENIZER_MODES))
    revision: str | None = _field(None, "Hub revision of the model.", type=str)
    tokenizer_revision: str | None = _field(
        None, "Hub revision of the tokenizer (default: --revision). With a hub model and no --tokenizer, "
        "the model repo's tokenizer is read at this revision.", type=str)
    hf_overrides: dict | None = _field(
        None, "JSON object of config.json fields that replace the checkpoint's (a .gguf's metadata is read "
        "as the same fields), e.g. '{\"max_position_embeddings\": 4096}' or a rope_scaling.", type=json_object)
    runner: str = _field(
        "auto", "What the model runs for: generate (text), or pooling (embeddings: LLM.embed and /v1/embeddings; no "
        "text generation). auto: pooling for a checkpoint of a bare model (architectures such as LlamaModel or "
        "Qwen3Model, which have no lm_head), generate otherwise. docs/embeddings.md.", choices=list(RUNNERS))
    pooler_config: dict | None = _field(
        None, "JSON object of the pooling runner's settings, over the model folder's sentence-transformers files: "
        "pooling_type (LAST, MEAN or CLS; default LAST) and normalize (default true), e.g. "
        "'{\"pooling_type\": \"MEAN\"}'.", type=json_object)
    load_format: str = _field("auto", "Weights format.", choices=["auto", "safetensors", "gguf", "orbax", "dummy"])
    dtype: str = _field(
        "auto", "Params and compute dtype. auto: float32 on CPU, the checkpoint's dtype on GPU. On a CPU "
        "without AVX512-BF16 or AMX, bfloat16/float16 fall back to float32 (they would be slower); "
        "with them, float16 runs as bfloat16.",
        choices=["auto", "float32", "bfloat16", "float16"])
    seed: int = _field(0, "Seed of the engine's random stream (draws seeds for unseeded requests).", type=int)
    max_model_len: int | None = _field(
        None, "Longest prompt + output, in tokens. Default: the model's limit (on CPU, at most what "
        "one sequence's KV fits in the KV cache).", type=int)
    block_size: int = _field(16, "Tokens per KV-cache block.", type=int)
    gpu_memory_utilization: float = _field(
        0.9, "Fraction of the accelerator's total memory for weights, activations and KV cache. "
        "On CPU: the fraction of available host memory the KV cache may take (see --kv-cache-memory).",
        type=float)
    kv_cache_memory: float | None = _field(
        None, f"KV-cache size in GiB (overrides --gpu-memory-utilization). On CPU the default "
        f"is min({DEFAULT_CPU_KV_CACHE_GIB:g} GiB, utilization x available memory).", type=float)
    kv_cache_memory_bytes: int | None = _field(
        None, "KV-cache size in bytes, vLLM's flag for --kv-cache-memory (4G = 4 GiB, 4g = 4 x 10^9 bytes); "
        "give one of the two.", type=human_readable_int)
    num_gpu_blocks_override: int | None = _field(
        None, "Exact number of KV blocks (including the null block 0); wins over memory sizing.", type=int)
    swap_space: float = _field(
        0.0, "Host memory in GiB for swapping preempted requests' KV blocks. 0 (default) "
        "preempts by recomputation instead.", type=float)
    max_num_seqs: int = _field(64, "Most requests in one step.", type=int)
    max_num_active_seqs: int | None = _field(
        None, "Most requests running at once (admitted from the queue), at most --max-num-seqs, which still sizes "
        "the compiled step shapes: smaller decode batches (lower TPOT, fewer tokens/s) with the same programs. "
        "Default: --max-num-seqs.", type=int)
    max_num_queued_reqs: int | None = _field(
        None, "Most unfinished requests (waiting or running; a request of n sequences counts n) the engine's front "
        "takes; a request over it is refused, by the server with a 503, so that clients retry later or elsewhere. "
        "Default: no limit. With --data-parallel-size, over all replicas.", type=int)
    max_num_queued_tokens: int | None = _field(
        None, "Most prompt tokens of requests still in prefill (queued, or no token sampled yet; each sequence counts "
        "its whole prompt): while the backlog is at or over it, new requests are refused with a 503. Set it to the "
        "TTFT you promise x the prefill speed (tokens/s). Default: no limit.", type=int)
    max_num_batched_tokens: int | None = _field(
        DEFAULT_MAX_NUM_BATCHED_TOKENS, f"Most tokens in one step: the prefill chunk size. Default "
        f"{DEFAULT_MAX_NUM_BATCHED_TOKENS}; python -m jpaged.serve's default (None) is "
        f"{SERVER_CPU_MAX_NUM_BATCHED_TOKENS} on CPU ({SERVER_CPU_AMX_MAX_NUM_BATCHED_TOKENS} on CPUs with AMX, "
        f"whose fast prefill gives a burst of requests its first tokens sooner in smaller chunks) and "
        f"{DEFAULT_MAX_NUM_BATCHED_TOKENS} elsewhere. Larger chunks: lower TPOT, higher TTFT.", type=int)
    long_prefill_token_threshold: int = _field(
        0, "While other requests run or wait, a request's chunk is at most this many tokens (0: off, the default), "
        "so a long prompt shares each step's token budget instead of taking it: the others' first tokens come "
        "sooner, its own later (vLLM's flag).", type=int)
    long_prefill_token_threshold_adaptive: bool = _field(
        False, "Never cap a chunk below the budget's fair share, --max-num-batched-tokens / the requests running "
        "and waiting (vLLM's flag; with --long-prefill-token-threshold).")
    num_scheduler_steps: int | None = _field(
        None, "Decode steps per scheduling round (multi-step scheduling): when every running request is "
        "decoding with at least this many tokens left, nothing waits to be admitted and no request needs the host "
        "between tokens (logprobs, penalties, logit_bias, min_tokens, structured outputs), one program "
        "runs this many steps, feeding each sampled token to the next, and the tokens arrive together. "
        f"Saves the host's work between steps; a request arriving meanwhile waits for the round. "
        f"Default: {DEFAULT_CPU_SCHEDULER_STEPS} on CPU, 1 (off) elsewhere.", type=int)
    speculative_config: dict | None = _field(
        None, "Speculative decoding, vLLM's JSON object: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
        "drafts up to 4 tokens per step by prompt lookup (the tokens that followed an earlier occurrence of the "
        "request's last prompt_lookup_min..prompt_lookup_max tokens, default 5..5; "
        "num_speculative_tokens_per_batch_size [[first, last, k], ...] sets k by running batch size) and verifies "
        "them in one forward: the same tokens, several per step where the text repeats its context. Requests "
        "with structured outputs or bad_words decode without drafts. Only method ngram (docs/engine.md).",
        type=json_object)
    spec_method: str | None = _field(
        None, "Shorthand for --speculative-config's method (e.g. ngram); not with that key in --speculative-config.")
    spec_model: str | None = _field(
        None, "Shorthand for --speculative-config's model (jpaged runs no draft model: ngram only).")
    spec_tokens: int | None = _field(
        None, "Shorthand for --speculative-config's num_speculative_tokens: --spec-method ngram --spec-tokens 4.",
        type=int)
    scheduler_delay_factor: float = _field(
        0.0, "While requests run, admit waiting requests only once the oldest has waited this factor x the "
        "latency of the last step that ran prompt tokens (vLLM V0's flag), so arrivals gather into fewer prefill "
        "steps, each of which stalls every running decode: lower TPOT under steady load for a higher TTFT "
        "(docs/scheduler.md). 0 (default): admit at once.", type=float)
    scheduler_finish_first: bool = _field(
        True, "While requests run, hold waiting requests when every running request is decoding and the ones "
        "closest to their max_tokens reach it sooner than a prefill step takes, if the waiting requests' summed wait "
        "costs less than that step's stall of those finishers (estimated from the latest steps' latencies): requests "
        "about to end end first, and their replacements prefill together. Lower TPOT under steady load for a "
        "somewhat higher TTFT (docs/scheduler.md).")
    scheduling_policy: str = _field(
        SCHEDULING_POLICIES[0], "The scheduling policy (vLLM's). fcfs: first come first served, requests are handled "
        "in order of arrival (a request's priority must be 0). priority: requests are handled by their priority "
        "(lower value = earlier), then arrival time; when the KV cache is full, the running request with the largest "
        "(priority, arrival time) is preempted. A waiting request never preempts a running one (docs/scheduler.md).",
        choices=list(SCHEDULING_POLICIES))
    enable_sleep_mode: bool = _field(
        False, "Allow sleep() / wake_up() (vLLM's sleep mode; the server's POST /sleep, POST /wake_up, GET "
        "/is_sleeping): release the KV cache's memory, and the weights' (level 2, or level 1 on a GPU, "
        "which keeps a host copy), between uses, e.g. while an RL trainer shares the device (docs/engine.md).")
    disable_sliding_window: bool = _field(
        False, "Run a sliding-window model (Mistral, Gemma 2/3) with full attention, its context capped at the window "
        "(vLLM's flag; models without a window are unchanged).")
    stream_interval: int = _field(
        1, "Tokens per streamed output: a request's first token and its last output are sent at once, "
        "the others once this many new tokens are ready (fewer SSE chunks for the host to write; a "
        "request's own stream_interval can only raise it).", type=int)
    enable_prefix_caching: bool = _field(True, "Reuse KV blocks of identical prompt prefixes.")
    enable_chunked_prefill: bool = _field(True, "Split long prompts across steps.")
    quantization: str | None = _field(
        None, "Weight quantization (docs/quantization.md). int8: weight-only int8 with per-output-channel "
        "scales for every linear layer, quantized at load (a GGUF's Q8_0 tensors are kept). fp8: the same with "
        "e4m3 values (GPU only). gguf: keep a .gguf model's Q8_0/Q4_0/Q4_1 blocks (embedding included) and "
        "dequantize them inside the step. Unset: weights in --dtype, except a compressed-tensors int8 checkpoint, "
        "which stays int8, and a .gguf on CPU in float32, which loads as with gguf (the C++ kernel gives the "
        "dequantized weights' results, faster); elsewhere a .gguf is dequantized at load.", type=str)
    kv_cache_dtype: str = _field(
        "auto", "KV-cache dtype. auto: the model dtype. int8, fp8 (= fp8_e4m3) and fp8_e5m2 store K and V in "
        "one byte with a static scale per layer and KV head (the checkpoint's k_scale/v_scale, else "
        "calibrated at start): 4x the blocks of float32 in the same memory, 2x those of bfloat16.",
        choices=list(KV_CACHE_DTYPES))
    enable_lora: bool = _field(
        False, "Serve LoRA adapters (PEFT checkpoints of q/k/v/o/gate/up/down_proj) on top of the model: a request "
        "names one (LoRARequest, or the server's model field), and requests with different adapters share a batch "
        "(docs/lora.md).")
    max_loras: int = _field(1, "Most LoRA adapters in one batch (device slots).", type=int)
    max_lora_rank: int = _field(16, "Largest LoRA rank served; every slot is this wide.",
                                choices=list(MAX_LORA_RANKS), type=int)
    max_cpu_loras: int | None = _field(
        None, "Most LoRA adapters kept in host memory (least recently used out, read again when needed). "
        "Default: --max-loras.", type=int)
    tensor_parallel_size: int = _field(
        1, "Devices to shard the model over (tensor parallel: attention heads, MLP and vocabulary split, "
        "KV cache split by KV heads; docs/distributed.md).", type=int)
    distributed_coordinator: str | None = _field(
        None, "HOST:PORT of host 0's jax.distributed coordinator: join a multi-host engine "
        "(docs/distributed.md). Every host runs the same command but for --host-id.", type=str)
    num_hosts: int = _field(1, "Hosts (processes) in the multi-host engine.", type=int)
    host_id: int = _field(0, "This host's rank, 0 to --num-hosts - 1; host 0 schedules and serves.", type=int)
    data_parallel_size: int = _field(
        1, "Engine replicas behind one router, replica i on jax.devices()[i*TP:(i+1)*TP] (TP: "
        "--tensor-parallel-size), each with its own scheduler and KV cache. Requests go to the least-loaded "
        "replica, or to the one that served the same prompt prefix unless that is much busier "
        "(docs/data_parallel.md). KV-cache flags are per replica, except that the CPU default budget is "
        "shared among them.", type=int)
    attention_backend: str = _field(
        "auto", "Paged attention implementation. auto: pallas on GPU, the C++ cpu kernel on CPU "
        "(falls back to reference with a warning when it is not built). With cpu on one device the "
        "float32 and bfloat16 linears also run through the same library's prepacked-weight matmul, and "
        "with AVX512-VNNI or AVX2 greedy decode rounds find their tokens without computing every logit.",
        choices=["auto", "reference", "pallas", "cpu"])
    compilation_cache_dir: str = _field(
        os.path.join(os.path.expanduser("~"), ".cache", "jpaged", "jax_cache"),
        "Compilation cache directory: JAX's persistent compilation cache, and in its executables/ "
        "folder the engine's compiled step programs, which later starts load without tracing "
        "('' disables both).", type=str)
    disable_log_stats: bool = _field(False, "Do not log engine statistics.")
    chat_template: str | None = _field(None, "Chat template (jinja text or a file) replacing the model's.", type=str)
    served_model_name: list[str] | None = _field(
        None, "Model names the API answers to; the first is reported in responses (default: --model).",
        type=str, nargs="+")
    hf_token: str | None = _field(
        None, "Hugging Face token for gated or private hub models and adapters (default: huggingface_hub's: "
        "$HF_TOKEN or the stored login).", type=str)
    download_dir: str | None = _field(
        None, "Folder to download and cache hub models in (default: the Hugging Face cache).", type=str)
    generation_config: str = _field(
        "auto", "Default sampling parameters: 'auto' or a folder applies the model's (or that folder's) "
        "generation_config.json, 'vllm' uses vLLM's defaults. A request's own fields always win.", type=str)
    override_generation_config: dict | None = _field(
        None, "JSON object of sampling defaults over --generation-config's, as generation_config.json names "
        "them (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), e.g. "
        "'{\"temperature\": 0.5}'.", type=json_object)
    profiler_config: dict | None = _field(
        None, "JSON object that turns on JAX's profiler for LLM.start_profile / stop_profile and the server's "
        "POST /start_profile, /stop_profile (vLLM's flag): '{\"profiler\": \"jax\", \"jax_profiler_dir\": "
        "\"/abs/dir\"}' writes traces of the engine's steps there (TensorBoard, Perfetto); optional "
        "\"delay_iterations\" and \"max_iterations\" count steps.", type=json_object)
    reasoning_parser: str | None = _field(
        None, "The reasoning model's markers: the server splits its chat replies into `reasoning` (the "
        "<think>...</think> text) and content, and requests may set thinking_token_budget. 'deepseek_r1' "
        "(DeepSeek-R1 and its distills) or 'qwen3'.", type=str, choices=sorted(REASONING_MARKERS))
    reasoning_config: dict | None = _field(
        None, "JSON object of the reasoning markers thinking_token_budget counts between (vLLM's flag): "
        "'{\"reasoning_start_str\": \"<think>\", \"reasoning_end_str\": \"</think>\"}'; each "
        "defaults to --reasoning-parser's. reasoning_end_str is what is forced once the budget runs out "
        "(it may lead into the end marker with a phrase).", type=json_object)
    trust_remote_code: bool = _field(
        False, "Accepted for vLLM compatibility; jpaged runs no model code from the hub and refuses a "
        "model whose config needs it.")
    enforce_eager: bool = _field(
        False, "Skip precompiling every step shape at startup: each shape compiles on first use "
        "(faster start, slower first requests).")
    # Request limits: checked before a request is queued (jpaged/request_validation.py).
    max_logprobs: int = _field(20, "Most logprobs / prompt_logprobs (top_logprobs in chat) a request may ask for.",
                               type=int)
    logprobs_mode: str = _field(
        LOGPROBS_MODES[0], "What logprobs and prompt_logprobs return: raw_* are the model's, before logit_bias, "
        "penalties, temperature and top_k / top_p / min_p; processed_* what a token is drawn from; *_logprobs "
        "log-softmax, *_logits the logits themselves (vLLM's values and default).",
        choices=list(LOGPROBS_MODES))
    max_logit_bias: int = _field(300, "Most logit_bias entries in one request.", type=int)
    max_stop_sequences: int = _field(64, "Most stop strings in one request.", type=int)
    max_stop_token_ids: int = _field(64, "Most stop_token_ids in one request.", type=int)
    max_n: int = _field(128, "Largest n (samples per prompt) a request may ask for.", type=int)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Adds one `--flag-name` per field (booleans get `--x/--no-x`)."""
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            meta = f.metadata
            if f.type is bool or f.type == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            elif meta["choices"] is not None:
                group.add_argument(flag, choices=meta["choices"], default=f.default, help=meta["help"],
                                   type=meta["type"])
            else:
                group.add_argument(flag, type=meta["type"], nargs=meta["nargs"], default=f.default, help=meta["help"])
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self):
        if self.quantization in ("", "none"):
            self.quantization = None
        from jpaged.models.quantization import check_method  # imports jax: only when EngineArgs is built

        check_method(self.quantization)
        if self.num_hosts > 1 and self.distributed_coordinator is None:
            raise ValueError(f"num_hosts={self.num_hosts} needs --distributed-coordinator HOST:PORT "
                             f"(host 0's address).")
        if not 0 <= self.host_id < self.num_hosts:
            raise ValueError(f"host_id must be in [0, {self.num_hosts}), got {self.host_id} (--host-id).")
        if self.num_hosts > 1 and self.data_parallel_size > 1:
            raise ValueError("--data-parallel-size > 1 is not supported with --num-hosts > 1; use one or the other.")
        if self.num_hosts > 1 and self.swap_space:
            raise ValueError("--swap-space is not supported with --num-hosts > 1 (each host would keep its own "
                             "swapped blocks); leave it 0, preemption then recomputes.")
        for name in ("tensor_parallel_size", "num_hosts", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "max_n", "data_parallel_size", "max_loras", "stream_interval"):
            if name == "max_num_batched_tokens" and self.max_num_batched_tokens is None:
                continue  # the server's default, per device (server_max_num_batched_tokens)
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} (--{name.replace('_', '-')}).")
        if self.max_num_active_seqs is not None and self.max_num_active_seqs < 1:
            raise ValueError(f"max_num_active_seqs must be >= 1, got {self.max_num_active_seqs} "
                             "(--max-num-active-seqs).")
        if self.max_num_active_seqs is not None and self.max_num_active_seqs > self.max_num_seqs:
            raise ValueError(f"max_num_active_seqs ({self.max_num_active_seqs}) cannot be greater than "
                             f"max_num_seqs ({self.max_num_seqs}).")
        for name in ("max_logprobs", "max_logit_bias", "max_stop_sequences", "max_stop_token_ids",
                     "max_num_queued_reqs", "max_num_queued_tokens", "long_prefill_token_threshold"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)} (--{name.replace('_', '-')}).")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}).")
        if self.enable_lora and self.num_hosts > 1:
            raise ValueError("--enable-lora is not supported with --num-hosts > 1 (the other hosts would not "
                             "load the adapters).")
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        if self.served_model_name is not None and not all(self.served_model_name):
            raise ValueError(f"served_model_name must be non-empty names, got {self.served_model_name!r}.")
        if not self.scheduler_delay_factor >= 0:  # NaN too
            raise ValueError(f"scheduler_delay_factor must be >= 0, got {self.scheduler_delay_factor} "
                             "(--scheduler-delay-factor).")
        if self.num_scheduler_steps is not None and self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be >= 1, got {self.num_scheduler_steps} "
                             f"(--num-scheduler-steps).")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len} (--max-model-len).")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization} "
                f"(--gpu-memory-utilization).")
        if self.kv_cache_memory_bytes is not None:
            if self.kv_cache_memory is not None:
                raise ValueError("give the KV-cache size once: --kv-cache-memory (GiB) or --kv-cache-memory-bytes.")
            if self.kv_cache_memory_bytes < 1:
                raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes} "
                                 f"(--kv-cache-memory-bytes).")
            self.kv_cache_memory = self.kv_cache_memory_bytes / 2**30
            self.kv_cache_memory_bytes = None  # one size from here on (and dataclasses.replace keeps working)
        for flag, key, value in (("--spec-method", "method", self.spec_method),
                                 ("--spec-model", "model", self.spec_model),
                                 ("--spec-tokens", "num_speculative_tokens", self.spec_tokens)):
            if value is None:
                continue
            self.speculative_config = dict(self.speculative_config or {})
            if key in self.speculative_config:
                raise ValueError(f"{flag} and --speculative-config['{key}'] are mutually exclusive")
            self.speculative_config[key] = value
        self.spec_method = self.spec_model = self.spec_tokens = None  # in speculative_config from here on
        if self.speculative_config is not None:
            from jpaged.engine.speculative import SpeculativeConfig  # jpaged.engine imports this module

            if not isinstance(self.speculative_config, dict):
                raise ValueError(f"speculative_config must be a dict (vLLM's keys), got {self.speculative_config!r}.")
            SpeculativeConfig.from_dict(self.speculative_config)  # its errors now, not at engine start
        if self.pooler_config is not None:
            resolve_pooler_config(None, self.pooler_config, None)  # its errors now, not at engine start
        if self.hf_overrides is not None and not isinstance(self.hf_overrides, dict):
            raise ValueError(f"hf_overrides must be a dict of config.json fields, got {self.hf_overrides!r}.")
        if self.profiler_config is not None:
            if not isinstance(self.profiler_config, dict):
                raise ValueError(f"profiler_config must be a dict, got {self.profiler_config!r}.")
            from jpaged.profiler import check_profiler_config  # imports jax: only when one is given

            check_profiler_config(self.profiler_config)
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_MARKERS:
            raise ValueError(f"reasoning_parser={self.reasoning_parser!r} is not one of {sorted(REASONING_MARKERS)}.")
        if self.reasoning_config is not None:
            check_reasoning_config(self.reasoning_config)
        if self.override_generation_config is not None and not isinstance(self.override_generation_config, dict):
            raise ValueError("override_generation_config must be a dict of generation_config.json fields, got "
                             f"{self.override_generation_config!r}.")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space} (--swap-space).")
        for name, choices in (("load_format", ["auto", "safetensors", "gguf", "orbax", "dummy"]),
                              ("runner", list(RUNNERS)),
                              ("dtype", ["auto", "float32", "bfloat16", "float16"]),
                              ("kv_cache_dtype", list(KV_CACHE_DTYPES)),
                              ("attention_backend", ["auto", "reference", "pallas", "cpu"]),
                              ("logprobs_mode", list(LOGPROBS_MODES)),
                              ("scheduling_policy", list(SCHEDULING_POLICIES)),
                              ("tokenizer_mode", list(TOKENIZER_MODES)),
                              ("max_lora_rank", list(MAX_LORA_RANKS))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}.")


def server_max_num_batched_tokens(platform: str, flags: frozenset[str] | None = None) -> int:
    """The prefill chunk where --max-num-batched-tokens is None (the server's default), for this
    device platform ("cpu", "gpu", ...) and, on CPU, the CPU's feature `flags` (None: this host's)."""
    if platform != "cpu":
        return DEFAULT_MAX_NUM_BATCHED_TOKENS
    return SERVER_CPU_AMX_MAX_NUM_BATCHED_TOKENS if has_amx(flags) else SERVER_CPU_MAX_NUM_BATCHED_TOKENS
