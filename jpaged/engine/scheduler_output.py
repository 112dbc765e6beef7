"""What runs in one step: a plain-Python description the runner turns into device arrays."""

import dataclasses

from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass(repr=False)
class ScheduledRequest:
    """One request's share of a step. The runner needs nothing else from the scheduler."""

    request_id: str
    token_ids: list[int]  # tokens to process this step; len = num_scheduled_tokens
    start_position: int  # num_computed_tokens before this step = position of token_ids[0]
    block_table: list[int]  # the request's whole current block table (a copy)
    sample: bool  # this chunk reaches the last known token: a token is sampled from its last row
    sampling_params: SamplingParams
    # Read-only references to the request's live lists (penalties need them); never copied.
    # The sampled token's index among outputs is len(output_token_ids) (seeds fold this in).
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]  # banned while fewer than min_tokens outputs exist
    # Speculative decoding: the last num_draft_tokens of token_ids are drafts (proposed, not yet
    # known to be the request's). A token is sampled after the pending token and after each draft.
    num_draft_tokens: int = 0

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def draft_token_ids(self) -> list[int]:
        """The chunk's drafts: the last num_draft_tokens of token_ids (empty without drafts)."""
        return self.token_ids[len(self.token_ids) - self.num_draft_tokens:]

    @property
    def num_sample_rows(self) -> int:
        """The chunk's rows in the step's logits and sampler outputs (padding-free order): its last
        token's and, with drafts, the pending token's and every draft's."""
        return 1 + self.num_draft_tokens

    @property
    def is_decode(self) -> bool:
        """Whether every token of this chunk is a generated one (a recomputed request's first
        chunks, which hold its prompt, are not)."""
        return self.start_position >= len(self.prompt_token_ids)

    def __repr__(self) -> str:
        return (
            f"ScheduledRequest(request_id={self.request_id!r}, num_scheduled_tokens={self.num_scheduled_tokens}, "
            f"start_position={self.start_position}, num_blocks={len(self.block_table)}, sample={self.sample}, "
            f"num_draft_tokens={self.num_draft_tokens})"
        )


@dataclasses.dataclass(repr=False)
class SchedulerOutput:
    """One step: the scheduled requests and the block copies to run before the forward."""

    scheduled: list[ScheduledRequest]  # batch order: decodes (is_decode) first, then prefill chunks
    total_num_scheduled_tokens: int
    finished_request_ids: set[str]  # finished/aborted since the last schedule(): drop their state
    blocks_to_swap_out: list[tuple[int, int]]  # (device block id, host slot): run before this step's forward
    blocks_to_swap_in: list[tuple[int, int]]  # (host slot, device block id): run after swap-outs, before the forward
    # Decode steps to run before the host sees the tokens (multi-step scheduling): > 1 only when
    # every scheduled request decodes its one pending token and has the blocks of all of them.
    num_steps: int = 1

    @classmethod
    def make_empty(cls) -> "SchedulerOutput":
        return cls(
            scheduled=[],
            total_num_scheduled_tokens=0,
            finished_request_ids=set(),
            blocks_to_swap_out=[],
            blocks_to_swap_in=[],
        )

    def __repr__(self) -> str:
        return (
            f"SchedulerOutput(scheduled={self.scheduled!r}, total_num_scheduled_tokens={self.total_num_scheduled_tokens}, "
            f"finished_request_ids={sorted(self.finished_request_ids)!r}, "
            f"blocks_to_swap_out={self.blocks_to_swap_out!r}, blocks_to_swap_in={self.blocks_to_swap_in!r}, "
            f"num_steps={self.num_steps})"
        )
