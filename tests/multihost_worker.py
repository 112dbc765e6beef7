"""One host of tests/test_multihost.py: python tests/multihost_worker.py MODEL_DIR NUM_HOSTS HOST_ID PORT.

NUM_HOSTS 1 runs the same engine in one process over 2 fake CPU devices. Host 0 prints
"TOKENS <json>" (greedy tokens, sampled logprobs and prompt logprobs of a small batch).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
model_dir, num_hosts, host_id, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if num_hosts == 1:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

from tensor_parallel_checks import PROMPTS, sharp_params  # noqa: E402

from jpaged import LLM, SamplingParams, multihost  # noqa: E402

distributed = dict(distributed_coordinator=f"127.0.0.1:{port}", num_hosts=num_hosts, host_id=host_id)
if num_hosts > 1:  # before sharp_params builds jax arrays
    multihost.initialize(f"127.0.0.1:{port}", num_hosts, host_id)
model, params = sharp_params(model_dir)
llm = LLM(model_dir, load_format="dummy", flax_model=model, params=params, tensor_parallel_size=2,
          max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=24,
          enforce_eager=True, compilation_cache_dir="", **(distributed if num_hosts > 1 else {}))
if host_id == 0:
    sampling = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outputs = llm.generate(PROMPTS, sampling, use_tqdm=False)
    result = [{"tokens": o.outputs[0].token_ids,
               "logprobs": [round(lp[t].logprob, 4) for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
               "prompt_logprobs": [None if lp is None else round(max(v.logprob for v in lp.values()), 4)
                                   for lp in o.prompt_logprobs]} for o in outputs]
    print("TOKENS " + json.dumps(result), flush=True)
    llm.shutdown()
