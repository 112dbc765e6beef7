"""Beam search over the engine: vLLM's `LLM.beam_search` and the server's `use_beam_search`.

A search keeps `beam_width` live beams. Each step asks the engine for one token of every live
beam with its top 2 * beam_width logprobs (one request per beam whose prompt is the beam's
tokens: the prefix cache holds what beams share, so a step computes only each beam's last
partial block). Every listed token extends its beam into a candidate; a candidate ending in an
EOS id (unless ignore_eos) is set aside as finished, the others compete and the beam_width with
the highest cumulative logprob live on. After max_tokens steps, or once no live beam can
still make the best beam_width (`BeamSearch._settled`), the finished and live beams are ranked
by `score` and the best beam_width returned.

The logprobs are the engine's (raw log_softmax of the logits by default, --logprobs-mode), so
the temperature only matters through the sampled token, which the engine lists besides the top
ones. This is vLLM's algorithm (after HF transformers'); `BeamSearch` holds one prompt's beams
and is driven by `LLM.beam_search` (all prompts' beams in one `generate` per step) or by
`run_beam_search` (the server: each beam a request on the AsyncLLM).
"""

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable

from jpaged.outputs import Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams: `beam_width` beams (and sequences returned), each at most
    `max_tokens` new tokens. `length_penalty`: the score divides the cumulative logprob by
    length ** length_penalty (1.0: per-token average; 0: none). `include_stop_str_in_output`
    keeps a finished beam's EOS in the server's text and token ids."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")

    def step_params(self) -> SamplingParams:
        """What the engine runs for each beam at each step: one token and its top 2 * beam_width."""
        return SamplingParams(max_tokens=1, logprobs=2 * self.beam_width, temperature=self.temperature,
                              detokenize=False)


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's then the generated ones (a finished beam ends with its
    EOS id); `logprobs` holds, per generated token, the top logprobs its step returned."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None  # set on the returned beams
    finish_reason: str | None = None  # "stop" (EOS), "length", "abort"
    stop_reason: int | None = None  # the EOS id that finished it


@dataclasses.dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first (at most beam_width)."""

    sequences: list[BeamSearchSequence]


def score(beam: BeamSearchSequence, eos_token_ids: Iterable[int], length_penalty: float) -> float:
    """cum_logprob / length ** length_penalty, the length counting the prompt and not a final EOS."""
    length = len(beam.tokens) - (beam.tokens[-1] in eos_token_ids)
    return beam.cum_logprob / max(length, 1) ** length_penalty


class BeamSearch:
    """The beams of one prompt: `live` needs the engine's next step for each of them, then
    `advance` with the step's outputs; `done` once nothing is left to run; `best()` at the end."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: Iterable[int]):
        self.prompt_len = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.live = [BeamSearchSequence(list(prompt_token_ids))]
        self.finished: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.params.max_tokens or self._settled()

    def _settled(self) -> bool:
        """Whether no live beam can enter the best beam_width any more, so more steps would not
        change `best()`: logprobs are <= 0, so a live beam's score can at most reach its
        cum_logprob over the length that favours it (the longest for length_penalty > 0, its
        current one otherwise). vLLM runs on to max_tokens; the result is the same."""
        width, penalty = self.params.beam_width, self.params.length_penalty
        if len(self.finished) < width:
            return False
        kept = sorted((score(b, self.eos_token_ids, penalty) for b in self.finished), reverse=True)[width - 1]
        longest = self.prompt_len + self.params.max_tokens
        return all(beam.cum_logprob / max(longest if penalty > 0 else len(beam.tokens), 1) ** penalty < kept
                   for beam in self.live)

    def advance(self, outputs: list[RequestOutput]) -> None:
        """Extends the live beams by the step's outputs (one per live beam, in order).
        RuntimeError when the engine failed a step (output.error)."""
        failed = next((o for o in outputs if o.error is not None), None)
        if failed is not None:
            raise RuntimeError(f"the engine failed while running a beam search step: {failed.error}")
        if any(o.outputs[0].finish_reason == "abort" for o in outputs):
            self.abort()
            return
        candidates = []
        for beam, output in zip(self.live, outputs, strict=True):
            top = output.outputs[0].logprobs[0]
            for token_id, logprob in top.items():
                candidate = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [top],
                                               beam.cum_logprob + logprob.logprob)
                if token_id in self.eos_token_ids and not self.params.ignore_eos:
                    candidate.finish_reason, candidate.stop_reason = "stop", token_id
                    self.finished.append(candidate)
                else:
                    candidates.append(candidate)
        candidates.sort(key=lambda c: -c.cum_logprob)  # stable: ties keep the earlier beam's
        self.live = candidates[:self.params.beam_width]
        self.steps += 1

    def abort(self) -> None:
        """Ends the search (its requests were aborted); the beams so far are kept as "abort"."""
        for beam in self.live:
            beam.finish_reason = "abort"
        self.finished += self.live
        self.live = []

    def best(self) -> list[BeamSearchSequence]:
        """The beam_width best of the finished and live beams by `score`, best first; live ones
        finish with "length"."""
        for beam in self.live:
            beam.finish_reason = beam.finish_reason or "length"
        beams = self.finished + self.live
        key = lambda b: -score(b, self.eos_token_ids, self.params.length_penalty)  # noqa: E731
        return sorted(beams, key=key)[:self.params.beam_width]


async def run_beam_search(search: BeamSearch, run_step: Callable[[list[int], str], Awaitable[RequestOutput]]
                          ) -> list[BeamSearchSequence]:
    """Runs `search` to the end and returns its best beams (text unset). Each step's beams run as
    concurrent `run_step(tokens, "{step}-{i}")` calls, which return the final RequestOutput of
    one engine request with `search.params.step_params()`. What a call raises ends the search
    (the step's other calls are cancelled, which aborts their requests); so does cancelling."""
    while not search.done:
        tasks = [asyncio.ensure_future(run_step(beam.tokens, f"{search.steps}-{i}"))
                 for i, beam in enumerate(search.live)]
        try:
            outputs = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        search.advance(outputs)
    return search.best()
