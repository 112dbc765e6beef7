"""Multi-host serving: every host joins one jax.distributed job and runs every step's programs
(SPMD over the mesh spanning all hosts' devices); host 0 alone schedules and serves.

Host 0 sends each step's inputs (the bucket sizes in a fixed-size header, then the step's int32
arrays packed into one) with `multihost_utils.broadcast_one_to_all`, a collective over the same
devices; the other hosts receive them in `ModelRunner.follow` and run the same programs, so all
hosts enter every collective in the same order. A STOP header ends the followers.
"""

import dataclasses
import logging

import jax
import numpy as np

logger = logging.getLogger(__name__)

HEADER_SIZE = 8
STEP, STOP = 1, 2


def initialize(coordinator: str | None, num_hosts: int, host_id: int) -> None:
    """Joins the jax.distributed job (before any device is touched); nothing when coordinator is
    None or the process already joined (a caller that builds jax arrays before the engine must
    call this first). CPU hosts exchange collectives through gloo."""
    if coordinator is None or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("joining %s as host %d of %d", coordinator, host_id, num_hosts)
    jax.distributed.initialize(coordinator, num_processes=num_hosts, process_id=host_id)
    logger.info("host %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def is_leader() -> bool:
    """Whether this process schedules and serves (host 0, or the only host)."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's device inputs, all host int32 arrays, as host 0 built them."""

    num_tokens: int
    num_seqs: int
    pages_per_seq: int
    num_entries: int
    decode_only: bool
    forward_blob: np.ndarray  # i32[StepMetadata.blob_size(...)]
    sampling_blob: np.ndarray  # i32[SamplingMetadata.blob_size(...)]
    token_bitmask: np.ndarray | None  # i32[num_seqs, cdiv(vocab, 32)]
    prompt_targets: np.ndarray | None  # i32[num_tokens]: present when a request asked for prompt_logprobs

    def header(self) -> np.ndarray:
        sizes = [self.num_tokens, self.num_seqs, self.pages_per_seq, self.num_entries, int(self.decode_only),
                 -1 if self.token_bitmask is None else self.token_bitmask.shape[1],
                 int(self.prompt_targets is not None)]
        return np.asarray([STEP] + sizes, np.int32)

    def payload(self) -> np.ndarray:
        parts = [self.forward_blob, self.sampling_blob, self.token_bitmask, self.prompt_targets]
        return np.concatenate([p.reshape(-1) for p in parts if p is not None]).astype(np.int32)


def send_step(step: StepInputs) -> None:
    """Host 0: hands the step to the other hosts (two broadcasts)."""
    from jax.experimental import multihost_utils

    multihost_utils.broadcast_one_to_all(step.header())
    multihost_utils.broadcast_one_to_all(step.payload())


def stop_followers() -> None:
    """Host 0 of several: ends the other hosts' `ModelRunner.follow`. Nothing on one host."""
    if jax.process_count() == 1 or not is_leader():
        return
    from jax.experimental import multihost_utils

    multihost_utils.broadcast_one_to_all(np.asarray([STOP] + [0] * (HEADER_SIZE - 1), np.int32))


def receive_step(forward_size, sampling_size) -> StepInputs | None:
    """Another host: the next step from host 0, or None at STOP. forward_size(t, s, p) and
    sampling_size(s, e) give the blob sizes."""
    from jax.experimental import multihost_utils

    header = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(HEADER_SIZE, np.int32)))
    if header[0] == STOP:
        return None
    t, s, p, e, decode_only, mask_width, has_targets = (int(v) for v in header[1:])
    sizes = [forward_size(t, s, p), sampling_size(s, e), s * mask_width if mask_width >= 0 else 0,
             t if has_targets else 0]
    payload = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(sum(sizes), np.int32)))
    forward, sampling, mask, targets = np.split(payload, np.cumsum(sizes)[:-1])
    return StepInputs(t, s, p, e, bool(decode_only), forward, sampling,
                      mask.reshape(s, mask_width) if mask_width >= 0 else None, targets if has_targets else None)
