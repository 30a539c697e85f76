"""The reference ops against plain torch / plain loops, over non-power-of-2 sizes and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtc.kernels import reference as ops

# Every tolerance used in this file.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}

SHAPES = [(1, 1, 8), (2, 63, 64), (1, 576, 64), (2, 577, 64), (3, 729, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def shape_id(b: int, n: int, d: int, dtype: torch.dtype | None = None) -> str:
    return f"B{b}-N{n}-D{d}" + (f"-{DTYPE_IDS[dtype]}" if dtype is not None else "")


def shape_params(dtypes: list[torch.dtype] | None = None, shapes: list[tuple[int, int, int]] = SHAPES) -> list:
    if dtypes is None:
        return [pytest.param(b, n, d, id=shape_id(b, n, d)) for b, n, d in shapes]
    return [pytest.param(b, n, d, t, id=shape_id(b, n, d, t)) for b, n, d in shapes for t in dtypes]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def random_kept(b: int, n: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])


# --- cosine_similarity -------------------------------------------------------------------------------------


def cosine_expected(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, N, D] x [B, M, D] -> [B, N, M] with torch's cosine_similarity, in row blocks (bounded memory)."""
    out = []
    for b in range(x.shape[0]):
        blocks = [
            F.cosine_similarity(xs.unsqueeze(1), y[b].float().unsqueeze(0), dim=-1) for xs in x[b].float().split(64)
        ]
        out.append(torch.cat(blocks))
    return torch.stack(out)


@pytest.mark.parametrize(("b", "n", "d"), shape_params())
def test_cosine_similarity_self(b, n, d):
    x = randn(b, n, d)
    got = ops.cosine_similarity(x, x)
    assert got.dtype == torch.float32 and got.shape == (b, n, n)
    torch.testing.assert_close(got, cosine_expected(x, x), **TOL[torch.float32])
    torch.testing.assert_close(ops.cosine_similarity(x, x.clone()), got, **TOL[torch.float32])


@pytest.mark.parametrize(("b", "n", "d", "dtype"), shape_params([torch.float16, torch.bfloat16]))
def test_cosine_similarity_low_precision_is_fp32_of_upcast(b, n, d, dtype):
    x = randn(b, n, d, dtype=dtype)
    got = ops.cosine_similarity(x, x)
    assert got.dtype == torch.float32
    assert torch.equal(got, ops.cosine_similarity(x.float(), x.float()))


@pytest.mark.parametrize("m", [1, 63, 577])
@pytest.mark.parametrize(("b", "n", "d"), shape_params())
def test_cosine_similarity_two_sets(b, n, d, m):
    x, y = randn(b, n, d, seed=0), randn(b, m, d, seed=1)
    got = ops.cosine_similarity(x, y)
    assert got.shape == (b, n, m)
    torch.testing.assert_close(got, cosine_expected(x, y), **TOL[torch.float32])


def test_cosine_similarity_zero_vector_is_zero_not_nan():
    x = randn(1, 5, 8)
    x[0, 2] = 0
    got = ops.cosine_similarity(x, x)
    assert torch.isfinite(got).all()
    assert (got[0, 2] == 0).all() and (got[0, :, 2] == 0).all()


# --- gather_rows -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, "all"])
@pytest.mark.parametrize(("b", "n", "d", "dtype"), shape_params(DTYPES))
def test_gather_rows_bit_exact(b, n, d, dtype, k):
    k = n if k == "all" else min(k, n)
    x = randn(b, n, d, dtype=dtype)
    idx = random_kept(b, n, k)
    got = ops.gather_rows(x, idx)
    assert got.dtype == dtype
    assert torch.equal(got, x[torch.arange(b).unsqueeze(1), idx])


def test_gather_rows_unsorted_and_repeated_indices():
    x = randn(2, 10, 4)
    idx = torch.tensor([[9, 0, 9, 3], [1, 1, 1, 1]])
    assert torch.equal(ops.gather_rows(x, idx), x[torch.arange(2).unsqueeze(1), idx])


# --- merge_rows --------------------------------------------------------------------------------------------


def random_merge(b: int, n: int, k: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices and targets: kept tokens target their own slot, the others a random slot."""
    g = torch.Generator().manual_seed(seed)
    kept = random_kept(b, n, k, seed=seed)
    targets = torch.randint(0, k, (b, n), generator=g)
    targets.scatter_(1, kept, torch.arange(k).expand(b, k).clone())
    return kept, targets


def merge_expected(x: torch.Tensor, targets: torch.Tensor, k: int, sizes: torch.Tensor | None) -> torch.Tensor:
    """sum(x * size) / sum(size) over each slot's group, with a plain loop in fp64."""
    b, n, d = x.shape
    totals = torch.zeros(b, k, d, dtype=torch.float64)
    weights = [[0.0] * k for _ in range(b)]
    for row in range(b):
        for i in range(n):
            slot = int(targets[row, i])
            w = 1.0 if sizes is None else float(sizes[row, i])
            totals[row, slot] += x[row, i].double() * w
            weights[row][slot] += w
    return totals / torch.tensor(weights, dtype=torch.float64).unsqueeze(-1)


MERGE_SHAPES = [(1, 1, 8, 1), (2, 63, 16, 5), (1, 63, 16, 62), (2, 200, 16, 20), (1, 577, 8, 64)]


@pytest.mark.parametrize("with_sizes", [False, True], ids=["no-sizes", "sizes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[t] for t in DTYPES])
@pytest.mark.parametrize(("b", "n", "d", "k"), MERGE_SHAPES, ids=[f"{shape_id(*s[:3])}-K{s[3]}" for s in MERGE_SHAPES])
def test_merge_rows_is_size_weighted_mean(b, n, d, k, dtype, with_sizes):
    x = randn(b, n, d, dtype=dtype)
    kept, targets = random_merge(b, n, k)
    sizes = torch.randint(1, 6, (b, n), generator=torch.Generator().manual_seed(3)) if with_sizes else None
    got = ops.merge_rows(x, kept, targets, sizes)
    assert got.dtype == dtype and got.shape == (b, k, d)
    expected = merge_expected(x, targets, k, sizes).to(dtype)
    torch.testing.assert_close(got, expected, **TOL[dtype])


def test_merge_rows_singletons_are_gather():
    """Every token its own group: merging is the gather of the kept rows, bit for bit."""
    x = randn(2, 63, 16)
    kept = torch.arange(63).expand(2, 63)
    assert torch.equal(ops.merge_rows(x, kept, kept.clone()), ops.gather_rows(x, kept))
    sizes = torch.randint(1, 9, (2, 63))
    torch.testing.assert_close(ops.merge_rows(x, kept, kept.clone(), sizes), x, rtol=0, atol=1e-6)


# --- mask_to_indices / fill_top ----------------------------------------------------------------------------


def test_mask_to_indices():
    chosen = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    assert ops.mask_to_indices(chosen).tolist() == [[0, 2, 3], [1, 2, 4]]


def test_fill_top_adds_highest_unchosen_per_row():
    score = randn(3, 63, seed=4)
    chosen = torch.zeros(3, 63, dtype=torch.bool)
    chosen[0, :5] = True
    chosen[1, 10] = True
    counts = torch.tensor([3, 0, 7])
    before = chosen.clone()
    got = ops.fill_top(chosen, score, counts)
    assert torch.equal(got & chosen, chosen), "already chosen tokens stay chosen"
    assert got.sum(1).tolist() == [8, 1, 7]
    for row in range(3):
        free = [i for i in range(63) if not chosen[row, i]]
        best = sorted(free, key=lambda i: -float(score[row, i]))[: int(counts[row])]
        assert sorted(best) == [i for i in range(63) if got[row, i] and not chosen[row, i]]
    assert torch.equal(chosen, before), "the input mask is not modified"


# --- maxmin_select (DivPrune) ------------------------------------------------------------------------------


def maxmin_expected(x: torch.Tensor, k: int, protected: list[int] | None = None) -> list[int]:
    """Greedy max-min under d = 1 - cos, one image [N, D]; the paper form when nothing is protected."""
    normed = x.float() / x.float().norm(dim=1, keepdim=True)
    dist = 1.0 - normed @ normed.t()
    selected = list(protected or [])
    if x.shape[0] == 1:
        return [0][:k]
    while len(selected) < k:
        if not selected:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = torch.min(dist[selected], dim=0).values
            scores[selected] = float("-inf")
        selected.append(int(torch.argmax(scores)))
    return sorted(selected)


@pytest.mark.parametrize("k", [1, 2, 17, 56])
@pytest.mark.parametrize(("b", "n", "d", "dtype"), shape_params([torch.float32, torch.bfloat16], SHAPES[1:]))
def test_maxmin_select_matches_greedy(b, n, d, dtype, k):
    x = randn(b, n, d, dtype=dtype)
    got = ops.maxmin_select(x, k)
    assert got.shape == (b, k)
    for row in range(b):
        assert got[row].tolist() == maxmin_expected(x[row], k)


def test_maxmin_select_single_token():
    assert ops.maxmin_select(randn(2, 1, 8), 1).tolist() == [[0], [0]]


@pytest.mark.parametrize(("b", "n", "d"), [(2, 63, 16), (3, 577, 16)], ids=["B2-N63-D16", "B3-N577-D16"])
def test_maxmin_select_continues_from_protected(b, n, d):
    x = randn(b, n, d)
    k = 20
    protected = torch.zeros(b, n, dtype=torch.bool)
    picks = [[3, 7, 40], [], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]][:b]
    for row, cols in enumerate(picks):
        protected[row, cols] = True
    before = protected.clone()
    got = ops.maxmin_select(x, k, protected)
    for row in range(b):
        assert got[row].tolist() == maxmin_expected(x[row], k, picks[row])
    assert torch.equal(protected, before), "the protected mask is not modified"


# --- pivot_select (DART) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k_extra", [0, 1, 5, 40])
@pytest.mark.parametrize("p", [1, 3, 8])
@pytest.mark.parametrize(("b", "n", "d"), [(1, 63, 16), (2, 577, 16)], ids=["B1-N63-D16", "B2-N577-D16"])
def test_pivot_select_count_exact(b, n, d, p, k_extra):
    x = randn(b, n, d)
    g = torch.Generator().manual_seed(5)
    pivots = torch.stack([torch.randperm(n, generator=g)[:p] for _ in range(b)])
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[0, [i for i in range(0, n, 13) if i not in pivots[0]][:2]] = True
    k = p + 2 + k_extra
    for prot in (None, protected):
        got = ops.pivot_select(x, pivots, k, prot)
        assert got.shape == (b, k)
        assert (got.diff(dim=1) > 0).all()
        mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, got, True)
        assert mask.gather(1, pivots).all(), "pivots are kept"
        if prot is not None:
            assert not (prot & ~mask).any(), "protected tokens are kept"


def test_pivot_select_takes_least_similar_to_single_pivot():
    x = randn(1, 63, 16)
    pivot = 10
    sims = F.cosine_similarity(x[0], x[0, pivot].unsqueeze(0), dim=-1)
    sims[pivot] = float("inf")
    expected = sorted([pivot] + sims.argsort()[:6].tolist())
    assert ops.pivot_select(x, torch.tensor([[pivot]]), 7).tolist() == [expected]


# --- nearest_kept ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 62])
@pytest.mark.parametrize(("b", "n", "d", "dtype"), shape_params([torch.float32, torch.float16]))
def test_nearest_kept(b, n, d, dtype, k):
    k = min(k, n)
    x = randn(b, n, d, dtype=dtype)
    kept = random_kept(b, n, k)
    got = ops.nearest_kept(x, kept)
    assert got.dtype == torch.long and got.shape == (b, n)
    assert torch.equal(got.gather(1, kept), torch.arange(k).expand(b, k)), "kept tokens map to their own slot"
    sims = cosine_expected(x, ops.gather_rows(x, kept))  # [B, N, K]
    for row in range(b):
        kept_set = set(kept[row].tolist())
        for i in range(n):
            if i not in kept_set:
                assert int(got[row, i]) == int(sims[row, i].argmax()), (row, i)


def test_maxmin_select_rows_that_run_out_of_candidates():
    """A row whose budget is mostly protected stops picking while the others continue; its idle
    steps must not disturb what it kept (regression: idle picks can repeat an index)."""
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))
    protected = torch.zeros(2, 10, dtype=torch.bool)
    protected[1, 1:] = True
    for _ in range(20):
        out = ops.maxmin_select(x, 9, protected)
        assert torch.equal(out[1], torch.arange(1, 10))
        assert out[0].unique().numel() == 9
