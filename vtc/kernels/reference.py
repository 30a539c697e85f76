"""Pure-torch reference ops for the visual-token path.

These are the CPU implementation and the oracle for any faster backend. All arithmetic is fp32:
inputs of any floating dtype are upcast (bf16 matmuls on CPU are several times slower than fp32,
and selection must not depend on the model's precision).

Non-finite inputs: value ops (similarity, gather, merge) propagate NaN as IEEE arithmetic does. The
selections never let it break their count: they return exactly k distinct sorted indices per row
for any input. A NaN cosine similarity (a token with a NaN or inf feature) counts as the lowest
similarity, i.e. the token is farthest from every other; a NaN score ranks above every number, as
in torch.topk. vtc's methods refuse non-finite signals before they get here (vtc/methods/base.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two token sets: [B, N, D] x [B, M, D] -> [B, N, M] (fp32)."""
    xn = F.normalize(x.float(), dim=-1, eps=_EPS)
    yn = xn if y is x else F.normalize(y.float(), dim=-1, eps=_EPS)
    return torch.bmm(xn, yn.transpose(1, 2))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Batched row gather: [B, N, D] x [B, K] -> [B, K, D], dtype of x."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_rows_varlen(
    x: torch.Tensor, cu_seqlens: torch.Tensor, idx: torch.Tensor, cu_seqlens_idx: torch.Tensor
) -> torch.Tensor:
    """Row gather over packed sequences (images of different sizes, no padding).

    Args:
        x: [T, D] the rows of S sequences, one after another.
        cu_seqlens: [S + 1] int, sequence s is rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1 of x.
        idx: [K_total] int64, each sequence's row indices local to it (0 .. its length - 1), packed.
        cu_seqlens_idx: [S + 1] int, sequence s owns idx[cu_seqlens_idx[s] : cu_seqlens_idx[s + 1]].

    Returns:
        [K_total, D] in x's dtype: row cu_seqlens[s] + idx[j] of x for every j of sequence s.
    """
    counts = cu_seqlens_idx.diff()
    starts = cu_seqlens[:-1].to(idx.device).repeat_interleave(counts, output_size=idx.shape[0])
    return x[starts + idx]


def merge_rows(
    x: torch.Tensor, kept: torch.Tensor, targets: torch.Tensor, sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Size-weighted merge of every token into its target kept token.

    Args:
        x: [B, N, D] token values.
        kept: [B, K] indices of the kept tokens.
        targets: [B, N] for each token, the slot in ``kept`` (0..K-1) it merges into; a kept token
            targets its own slot.
        sizes: [B, N] how many original tokens each input token already stands for (default 1).

    Returns:
        [B, K, D] in x's dtype: sum(x * size) / sum(size) over each kept token's group.
    """
    b, _, d = x.shape
    k = kept.shape[1]
    weight = torch.ones(targets.shape, dtype=torch.float32, device=x.device) if sizes is None else sizes.float()
    sums = torch.zeros(b, k, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, targets.unsqueeze(-1).expand(-1, -1, d), x.float() * weight.unsqueeze(-1))
    total = torch.zeros(b, k, dtype=torch.float32, device=x.device).scatter_add_(1, targets, weight)
    return (sums / total.unsqueeze(-1)).to(x.dtype)


def mask_to_indices(chosen: torch.Tensor) -> torch.Tensor:
    """[B, N] bool with the same count K in every row -> [B, K] sorted indices of the True entries.

    Raises ValueError if the rows hold different counts: a [B, K] result would have to drop or invent
    indices, and a short row means a selection picked some token twice.
    """
    b, n = chosen.shape
    counts = chosen.sum(dim=1)  # [B]
    low, high = torch.stack(torch.aminmax(counts)).tolist() if b else (0, 0)
    if low != high:
        shown = counts.tolist() if b <= 16 else counts[:16].tolist() + ["..."]
        raise ValueError(
            f"mask_to_indices needs the same number of chosen tokens in every row, got counts {shown} "
            f"(between {low} and {high}); a selection that picks a token twice leaves its row short"
        )
    order = torch.arange(n, device=chosen.device).expand(b, n).masked_fill(~chosen, n)
    return order.sort(dim=1).values[:, :high]


def fill_top(chosen: torch.Tensor, score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Add, per row, the ``counts[b]`` highest-scoring tokens not yet chosen.

    Higher scores first; NaN ranks above every number (torch.topk's order) and a -inf score still
    above every chosen token, so a row never takes a token twice while it has unchosen ones.

    Args:
        chosen: [B, N] bool, tokens already chosen (kept as they are).
        score: [B, N] fp32 scores.
        counts: [B] int, how many more tokens each row takes (at most its unchosen tokens).

    Returns:
        [B, N] bool, a new mask.
    """
    most = int(counts.max()) if counts.numel() else 0
    if most == 0:
        return chosen.clone()
    # Chosen tokens get -inf; an unchosen -inf is lifted to the lowest finite value so it cannot tie with them.
    free_score = score.clamp(min=torch.finfo(score.dtype).min).masked_fill_(chosen, float("-inf"))
    top = free_score.topk(most, dim=1).indices  # [B, most]
    take = torch.arange(most, device=score.device).unsqueeze(0) < counts.unsqueeze(1)
    return chosen.clone().scatter_(1, top, take | chosen.gather(1, top))


def maxmin_select(x: torch.Tensor, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity selection (DivPrune) under cosine distance.

    The first pick is the token farthest from its nearest neighbour; each next pick is the token
    whose distance to its closest already-picked token is largest (ties: lowest index). The running
    min-distance vector is updated with one row per pick, so a step costs O(N), not O(|S| N), and
    nothing is read back to the host inside the loop.

    Args:
        x: [B, N, D] token features.
        k: tokens to keep per row, 1 <= k <= N.
        protected: optional [B, N] bool, tokens that are kept first; the greedy search continues
            from them (their distances seed the min-distance vector).

    Returns:
        [B, k] sorted indices.
    """
    b, n, _ = x.shape
    dist = cosine_similarity(x, x).neg_().add_(1.0)  # [B, N, N], 1 - cos rounded as the paper's 1.0 - sim
    # torch.minimum and amin propagate NaN, which would undo the -inf "picked" marks and let argmax pick
    # a token twice: a NaN distance counts as +inf (farthest, never the minimum), and -inf is lifted so
    # that only picked tokens score -inf. The Triton kernel applies the same rule (_distance).
    dist.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=torch.finfo(dist.dtype).min)
    rows = torch.arange(b, device=x.device)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=x.device) if protected is None else protected.clone()
    has_seed = chosen.any(dim=1)  # [B]
    remaining = k - chosen.sum(dim=1)  # [B]

    # Scores are column-wise like the paper's: score[j] = min over (picked) rows i of dist[i, j].
    self_dist = dist.diagonal(dim1=1, dim2=2).clone()
    dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    min_dist = dist.amin(dim=1)  # nearest-neighbour distance, self excluded
    dist.diagonal(dim1=1, dim2=2).copy_(self_dist)
    if bool(has_seed.any()):
        seed_min = dist.masked_fill(~chosen.unsqueeze(2), float("inf")).amin(dim=1)  # [B, N]
        min_dist = torch.where(has_seed.unsqueeze(1), seed_min, min_dist)
    # A picked token's score is -inf; minimum() keeps it there, so no per-step masking is needed.
    min_dist.masked_fill_(chosen, float("-inf"))

    steps = int(remaining.max()) if b else 0
    picks = torch.empty(b, steps, dtype=torch.long, device=x.device)
    for step in range(steps):
        pick = min_dist.argmax(dim=1)  # [B]
        picks[:, step] = pick
        row = dist[rows, pick]  # [B, N]
        if step == 0:
            # Without protected tokens the first pick used nearest-neighbour distances; from now on
            # the score is the distance to the picked set only.
            min_dist = torch.where(has_seed.unsqueeze(1), torch.minimum(min_dist, row), row)
        else:
            torch.minimum(min_dist, row, out=min_dist)
        min_dist[rows, pick] = float("-inf")
    # Rows with protected tokens need fewer picks; their extra picks are ignored (and may repeat indices).
    taken = torch.arange(steps, device=x.device).unsqueeze(0) < remaining.unsqueeze(1)
    chosen[rows.unsqueeze(1).expand_as(picks)[taken], picks[taken]] = True
    return mask_to_indices(chosen)


def pivot_select(
    x: torch.Tensor,
    pivots: torch.Tensor,
    k: int,
    protected: torch.Tensor | None = None,
    num_pivots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Duplication-aware selection (DART): keep the pivots, then the tokens least similar to them.

    Pivots are visited in the order given; pivot j takes the not-yet-chosen tokens with the lowest
    cosine similarity to it. The budget left after pivots and protected tokens is split evenly over
    a row's pivots, the first ``rest % P`` pivots taking one more, so exactly ``k`` tokens are kept.

    Args:
        x: [B, N, D] token features.
        pivots: [B, P] pivot indices (distinct, not protected).
        k: tokens to keep per row, including pivots and protected tokens.
        protected: optional [B, N] bool, tokens that are always kept.
        num_pivots: optional [B], how many of the P pivots each row uses (the first ones; default P).

    Returns:
        [B, k] sorted indices.
    """
    b, n, _ = x.shape
    p = pivots.shape[1]
    used = torch.full((b,), p, device=x.device) if num_pivots is None else num_pivots.to(x.device)
    xn = F.normalize(x.float(), dim=-1, eps=_EPS)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=x.device) if protected is None else protected.clone()
    is_used = torch.arange(p, device=x.device).unsqueeze(0) < used.unsqueeze(1)  # [B, P]
    chosen.scatter_(1, pivots, is_used | chosen.gather(1, pivots))
    rest = k - chosen.sum(dim=1)  # [B]
    share, extra = rest // used.clamp(min=1), rest % used.clamp(min=1)
    sim = torch.bmm(xn, gather_rows(xn, pivots).transpose(1, 2))  # [B, N, P], one pass over x
    sim.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))  # NaN: least similar
    for j in range(p):
        counts = (share + (j < extra).long()) * is_used[:, j]
        chosen = fill_top(chosen, -sim[:, :, j], counts)
    return mask_to_indices(chosen)


def nearest_kept(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """For every token, the slot (0..K-1) of the most cosine-similar kept token; kept tokens map to themselves.

    Args:
        x: [B, N, D] token features.
        kept: [B, K] kept indices.

    Returns:
        [B, N] long.
    """
    return nearest_slots(cosine_similarity(x, gather_rows(x, kept)), kept)


def nearest_slots(sim: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[B, N, K] similarities of every token to the kept ones, [B, K] kept -> [B, N] slot of the most
    similar kept token (ties: lowest slot); a NaN similarity counts as the lowest (torch.argmax would
    take it as the largest); kept tokens map to their own slot."""
    targets = sim.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).argmax(dim=2)
    slots = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    return targets.scatter_(1, kept, slots)
