"""Length bucketing for folding many sequences: the one home of ``infer``'s, ``infer_pdbs``' and
``esm-dual fold``'s batches.

A batch is padded to its longest member, and the folding trunk's cost grows with the square (pair
state) to the cube (triangle updates) of the padded length, so folding a list as one batch can cost
many times more than folding its members one by one. :func:`fold_batches` groups sequences of
similar length, shortest first:

- at most ``max_tokens_per_batch`` padded residues per batch (fair-esm's ``--max-tokens-per-batch``:
  ``longest * count <= budget``; a sequence longer than the budget is a batch of its own), and
- a batch's modelled cost ``count * longest^2 + overhead`` (``overhead``: one fold's fixed cost, kernel
  launches, the stem and the structure module at small N) is never more than its members' own costs
  ``sum(n^2 + overhead)``: sequences are merged only where the padding costs less than the per-fold
  overhead that batching saves.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_MAX_TOKENS_PER_BATCH = 1024
DEFAULT_CHAIN_LINKER = "G" * 25  # ESMFold's (fair-esm's) poly-G linker between the chains of a multimer
# One fold's fixed cost in units of pair elements (residues^2): a fold of up to ~256 residues on a GPU
# takes about as long as a fold of one residue (launch-bound), so 256^2.
FOLD_OVERHEAD_PAIRS = 256 * 256


def folded_length(seq: str, chain_linker: str | None = DEFAULT_CHAIN_LINKER) -> int:
    """Residues of ``seq`` as folded: ``:``-separated chains joined by ``chain_linker``."""
    return len(seq.replace(":", "")) + len(chain_linker or "") * seq.count(":")


def fold_cost(lengths: Sequence[int], overhead: int = FOLD_OVERHEAD_PAIRS) -> int:
    """Modelled cost of folding ``lengths`` as one padded batch: count * longest^2 + overhead."""
    if not lengths:
        return 0
    n = max(int(x) for x in lengths)
    return len(lengths) * n * n + overhead


def fold_batches(
    lengths: Sequence[int],
    max_tokens_per_batch: int | None = DEFAULT_MAX_TOKENS_PER_BATCH,
    overhead: int = FOLD_OVERHEAD_PAIRS,
) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, shortest first (ties in input order).

    ``max_tokens_per_batch=None``: no token budget (the cost rule alone); 0 or 1: one sequence per
    batch. Each batch satisfies ``fold_cost(batch) <= sum(fold_cost([n]) for n in batch)`` and, with a
    budget, ``longest * count <= max_tokens_per_batch`` (or it holds a single sequence).
    """
    if max_tokens_per_batch is not None and (
        not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 0
    ):
        raise ValueError(f"max_tokens_per_batch must be a non-negative int or None, got {max_tokens_per_batch!r}")
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    batches: list[list[int]] = []
    buf: list[int] = []
    own = 0  # sum of the members' own costs
    for i in order:
        n = int(lengths[i])
        if buf:
            longest = max(n, int(lengths[buf[-1]]))
            count = len(buf) + 1
            over_budget = max_tokens_per_batch is not None and longest * count > max_tokens_per_batch
            dearer = count * longest * longest + overhead > own + n * n + overhead
            if over_budget or dearer:
                batches.append(buf)
                buf, own = [], 0
        buf.append(i)
        own += n * n + overhead
    if buf:
        batches.append(buf)
    return batches
