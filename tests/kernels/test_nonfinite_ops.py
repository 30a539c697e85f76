"""Non-finite and huge-but-finite inputs through every op, on both backends.

Selections (maxmin_select, pivot_select, nearest_kept, fill_top) must return exactly k distinct sorted
indices (valid slots) whatever the values; NaN similarity counts as the lowest on both backends.
mask_to_indices refuses rows of unequal counts instead of cutting them. Value ops propagate NaN.
Triton runs in its interpreter without CUDA (tests/conftest.py); its output buffers are poisoned so
that a slot a kernel leaves unwritten shows.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vtc import kernels
from vtc.kernels import dispatch
from vtc.kernels import reference as ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = HAS_TRITON and (DEVICE == "cuda" or dispatch.interpreting())
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton with CUDA or TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What one token's features are set to. "huge" is finite in bf16 / fp32 but its squared norm overflows fp32.
BAD = {"nan": float("nan"), "posinf": float("inf"), "neginf": float("-inf"), "huge": 1e30}
INDEX_POISON = -7
# [B, N, D]: B = 3 so that clean rows sit next to bad ones; N not a power of 2.
B, N, D = 3, 37, 16
# The interpreter runs numpy on NaN / inf and warns about it; the values are the point of these tests.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    if HAS_TRITON:
        from vtc.kernels.triton import _utils

        def empty(shape, dtype, device):
            fill = float("nan") if dtype.is_floating_point else INDEX_POISON
            return torch.full(shape, fill, dtype=dtype, device=device)

        monkeypatch.setattr(_utils, "empty", empty)


def features(kind: str, dtype: str = "fp32", *, seed: int = 0) -> torch.Tensor:
    """[B, N, D]: row 0 one bad token (index 5), row 1 clean, row 2 three bad tokens (0, 1 and the last)."""
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))
    value = BAD[kind] if kind != "huge" or dtype != "fp16" else 6e4  # fp16's largest are ~6.5e4
    x[0, 5] = value
    x[2, [0, 1, N - 1]] = value
    return x.to(DTYPES[dtype]).to(DEVICE)


def assert_exact(kept: torch.Tensor, b: int, n: int, k: int) -> None:
    assert kept.dtype == torch.long and tuple(kept.shape) == (b, k)
    assert int(kept.min()) >= 0 and int(kept.max()) < n
    assert (kept.diff(dim=1) > 0).all(), f"kept indices must be sorted and unique, got {kept.tolist()}"


def bad_kinds() -> list:
    return [pytest.param(kind, dtype, id=f"{kind}-{dtype}") for kind in BAD for dtype in DTYPES]


# --- maxmin_select (DivPrune) ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 20, N - 1, N])
@pytest.mark.parametrize(("kind", "dtype"), bad_kinds())
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxmin_select_exact_count(backend, kind, dtype, k):
    kept = kernels.maxmin_select(features(kind, dtype), k, backend=backend)
    assert_exact(kept, B, N, k)


def test_maxmin_select_bug_report():
    """One inf feature used to make row 0 pick a token twice and cut every row to 2 of 3."""
    x = torch.randn(2, 10, 4)
    x[0, 5] = float("inf")
    assert_exact(ref.maxmin_select(x, 3), 2, 10, 3)


@pytest.mark.parametrize("kind", ["nan", "posinf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxmin_select_with_protected_exact_count(backend, kind):
    x = features(kind)
    protected = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    protected[0, [5, 9]] = True  # the bad token and a clean one
    protected[2, 3] = True
    kept = kernels.maxmin_select(x, 8, protected, backend=backend)
    assert_exact(kept, B, N, 8)
    assert protected.sum() == protected.gather(1, kept).sum(), "protected tokens are kept"


@needs_triton
@pytest.mark.parametrize("materialize", [True, False], ids=["stored", "recomputed"])
@pytest.mark.parametrize("kind", ["nan", "posinf", "huge"])
def test_maxmin_kernel_both_distance_paths(kind, materialize):
    from vtc.kernels.triton import maxmin

    block = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "PICK_N": 16, "PICK_D": 16}  # several tiles per row
    kept, order = maxmin.maxmin_select(features(kind), 11, materialize=materialize, block=block, return_order=True)
    assert_exact(kept, B, N, 11)
    assert torch.equal(order.sort(dim=1).values, kept), "each pick is made once"


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxmin_nan_token_is_farthest(backend):
    """A NaN similarity is the lowest (distance +inf): the NaN token is the first pick, it is at distance
    +inf from every token, so the tie goes to token 0, and the rest is the greedy search among the clean
    tokens from {0}, the NaN distances never lowering a minimum."""
    x = features("nan")
    kept = kernels.maxmin_select(x, 6, backend=backend)[0].tolist()
    clean = torch.cat([x[0, :5], x[0, 6:]]).unsqueeze(0).cpu()  # row 0 without its NaN token (index 5)
    seed = torch.zeros(1, N - 1, dtype=torch.bool)
    seed[0, 0] = True
    rest = ref.maxmin_select(clean, 5, seed)[0].tolist()
    assert kept == sorted([5] + [i if i < 5 else i + 1 for i in rest])


@needs_triton
@pytest.mark.parametrize("kind", ["nan", "huge"])
def test_maxmin_backends_agree(kind):
    """Same rule on both backends: NaN counts as the farthest, a squared-norm overflow as a zero vector."""
    x = features(kind)
    assert torch.equal(
        kernels.maxmin_select(x, 9, backend="triton").cpu(), kernels.maxmin_select(x, 9, backend="torch").cpu()
    )


# --- pivot_select (DART) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 12, N])
@pytest.mark.parametrize(("kind", "dtype"), bad_kinds())
@pytest.mark.parametrize("backend", BACKENDS)
def test_pivot_select_exact_count(backend, kind, dtype, k):
    x = features(kind, dtype)
    pivots = torch.tensor([[0, 2, 5], [3, 4, 5], [0, 7, 8]], device=DEVICE)  # bad tokens among the pivots too
    protected = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    protected[1, 9] = True
    kept = kernels.pivot_select(x, pivots, k, protected, backend=backend)
    assert_exact(kept, B, N, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pivot_nan_token_is_least_similar(backend):
    """A NaN similarity is the lowest: the first pivot takes the NaN token first, on both backends."""
    x = features("nan")
    pivots = torch.tensor([[0, 1], [0, 1], [2, 3]], device=DEVICE)
    kept = kernels.pivot_select(x, pivots, 4, backend=backend)
    assert 5 in kept[0].tolist()
    assert len({0, 1, N - 1} & set(kept[2].tolist())) == 2, "each of row 2's pivots takes one of its NaN tokens"


# --- nearest_kept (DART merge) -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dtype"), bad_kinds())
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_kept_valid_slots(backend, kind, dtype):
    x = features(kind, dtype)
    kept = torch.tensor([[2, 5, 9, 20], [0, 1, 2, 3], [1, 4, 6, 30]], device=DEVICE)
    slots = kernels.nearest_kept(x, kept, backend=backend)
    assert slots.shape == (B, N) and int(slots.min()) >= 0 and int(slots.max()) < 4
    assert torch.equal(slots.gather(1, kept).cpu(), torch.arange(4).expand(B, 4)), "kept tokens keep their slot"
    if kind == "nan":
        # The NaN kept token (row 0, slot 1) attracts no clean token.
        clean = [i for i in range(N) if i != 5]
        assert (slots[0, clean] != 1).all()


# --- value ops ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "posinf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_value_ops_propagate_nan_only_where_it_belongs(backend, kind):
    x = features(kind)
    sim = kernels.cosine_similarity(x, x, backend=backend).cpu()
    clean = [i for i in range(N) if i != 5]
    assert torch.isfinite(sim[1]).all() and torch.isfinite(sim[0][clean][:, clean]).all()
    kept = torch.tensor([[4, 5], [0, 1], [2, 3]], device=DEVICE)
    targets = torch.zeros(B, N, dtype=torch.long, device=DEVICE)
    targets[:, 1::2] = 1
    targets.scatter_(1, kept, torch.tensor([[0, 1]] * B, device=DEVICE))
    merged = kernels.merge_rows(x, kept, targets, backend=backend).cpu()
    assert torch.isfinite(merged[1]).all(), "a clean row stays clean"
    gathered = kernels.gather_rows(x, kept, backend=backend).cpu()
    assert torch.equal(gathered.isnan(), x.cpu().gather(1, kept.cpu().unsqueeze(-1).expand(-1, -1, D)).isnan())


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cosine_overflowing_norm_is_a_zero_vector_on_both_backends(dtype):
    """Finite features whose squared norm overflows fp32: similarity 0, as the reference's x / inf = 0."""
    x = features("huge", dtype)
    got = kernels.cosine_similarity(x, x, backend="triton").cpu()
    expected = ref.cosine_similarity(x, x).cpu()
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5)
    assert (got[0, 5] == 0).all() and (got[2, 0, 1] == 0)


# --- fill_top / mask_to_indices ----------------------------------------------------------------------------


def test_fill_top_never_takes_a_chosen_token():
    """Unchosen -inf scores used to tie with the chosen tokens' -inf mask, so topk could take a chosen one."""
    g = torch.Generator().manual_seed(0)
    chosen = torch.rand(4, 577, generator=g) < 0.5
    score = torch.full((4, 577), float("-inf"))
    score[:, :100] = torch.randn(4, 100, generator=g)
    free = (~chosen).sum(dim=1)
    counts = free.clamp(max=int(free.min()))
    got = ref.fill_top(chosen, score, counts)
    assert torch.equal(got.sum(dim=1), chosen.sum(dim=1) + counts)
    assert torch.equal(got & chosen, chosen)


def test_fill_top_order_of_nan_and_inf():
    chosen = torch.tensor([[True, False, False, False, False]])
    score = torch.tensor([[9.0, float("-inf"), float("nan"), 0.0, float("inf")]])
    got = ref.fill_top(chosen, score, torch.tensor([3]))
    assert got[0].tolist() == [True, False, True, True, True], "NaN and +inf first, -inf last (torch.topk's order)"


def test_mask_to_indices_refuses_unequal_counts():
    chosen = torch.tensor([[True, False, True, True], [True, False, False, True], [False, True, True, True]])
    with pytest.raises(ValueError, match=r"same number of chosen tokens in every row.*\[3, 2, 3\]"):
        ref.mask_to_indices(chosen)


def test_mask_to_indices_equal_counts_and_empty_batch():
    chosen = torch.tensor([[True, False, True], [False, True, True]])
    assert ref.mask_to_indices(chosen).tolist() == [[0, 2], [1, 2]]
    assert ref.mask_to_indices(torch.zeros(0, 4, dtype=torch.bool)).shape == (0, 0)
