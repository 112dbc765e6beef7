"""Shape buckets: the one place warm-up and runtime agree on which padded shapes exist.

A step is padded to (num_tokens, num_seqs, pages_per_seq) buckets so a fixed set of programs,
all compiled at start, serves every batch:
- num_tokens: powers of two from 16 up to max_num_batched_tokens (the top bucket is the cap);
- num_seqs: powers of two from 8 up to max_num_seqs, tied to the token bucket: a step of t
  padded tokens gets the seqs bucket that min(t, max_num_seqs) sequences need (one step has at
  most one sequence per token). The cost of extra padded rows (a few lm_head rows, q_len-0
  sequences) is small next to compiling every (tokens, seqs) pair;
- pages_per_seq (block-table width): powers of two from MIN_PAGES up to
  cdiv(max_model_len, block_size), chosen from the batch's longest context, when the attention
  cost follows the table width (the pure-XLA reference); one width (the cap) for kernels whose
  cost follows the real context lengths (cpu, pallas);
- sampler entries (logit_bias, min_tokens masks, penalty tokens) per sequence bucket s: none,
  or the most s rows can hold. Padded entries cost a sparse gather/scatter each (about a
  millisecond for 150k on CPU), less than compiling a ladder of sizes.
"""

import dataclasses
import itertools

MIN_TOKENS = 16
MIN_SEQS = 8
# Tables narrower than 4 blocks cost the same as 4; fewer buckets means a faster start.
MIN_PAGES = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def power_of_2_buckets(low: int, cap: int) -> tuple[int, ...]:
    """Powers of two from `low` below `cap`, then `cap` itself (the top bucket is the cap, even
    when it is not a power of two or is below `low`)."""
    sizes = []
    size = low
    while size < cap:
        sizes.append(size)
        size *= 2
    sizes.append(cap)
    return tuple(sizes)


def pick(buckets: tuple[int, ...], n: int) -> int:
    """Smallest bucket >= n."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded sizes of every step. Build with `Buckets.create`."""

    num_tokens: tuple[int, ...]
    num_seqs: tuple[int, ...]
    pages_per_seq: tuple[int, ...]
    max_entries_per_seq: int  # the most sampler entries one request can bring

    @classmethod
    def create(cls, *, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
               block_size: int, bucket_pages: bool = True, max_entries_per_seq: int = 0) -> "Buckets":
        """bucket_pages: several table widths (True) or only the widest (False)."""
        max_pages = cdiv(max_model_len, block_size)
        return cls(
            num_tokens=power_of_2_buckets(MIN_TOKENS, max_num_batched_tokens),
            num_seqs=power_of_2_buckets(MIN_SEQS, max_num_seqs),
            pages_per_seq=power_of_2_buckets(min(MIN_PAGES, max_pages), max_pages) if bucket_pages else (max_pages,),
            max_entries_per_seq=max_entries_per_seq,
        )

    def entries_for_seqs(self, num_seqs_bucket: int) -> tuple[int, ...]:
        """The sampler-entries sizes of a sequence bucket: 0 and the most its rows can bring."""
        return tuple(sorted({0, num_seqs_bucket * self.max_entries_per_seq}))

    def sampler_shapes(self):
        """Every (num_seqs, num_entries) a sampler call can have."""
        for s in self.num_seqs:
            for e in self.entries_for_seqs(s):
                yield s, e

    def seqs_for_tokens(self, num_tokens_bucket: int) -> int:
        return pick(self.num_seqs, min(num_tokens_bucket, self.num_seqs[-1]))

    def step_shapes(self):
        """Every (num_tokens, num_seqs, pages_per_seq) a step can have."""
        for t, p in itertools.product(self.num_tokens, self.pages_per_seq):
            yield t, self.seqs_for_tokens(t), p

    def for_step(self, num_tokens: int, num_seqs: int, max_context: int, block_size: int):
        """The bucket of a step with these real sizes. num_seqs: its sequences or, with drafts,
        its sampled rows (ScheduledRequest.num_sample_rows), either way <= num_tokens."""
        t = pick(self.num_tokens, num_tokens)
        s = self.seqs_for_tokens(t)
        if num_seqs > s:
            raise ValueError(f"a step of {num_tokens} tokens cannot hold {num_seqs} sequences")
        return t, s, pick(self.pages_per_seq, cdiv(max_context, block_size))

