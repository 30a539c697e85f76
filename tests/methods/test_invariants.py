"""Invariants every registered method must satisfy, generated from the registry.

A method added to ``vtc.registry.METHODS`` is covered here without editing this file: it receives every
known signal (features, cls_attention, cls_attention_layers) and must keep exactly ``keep`` sorted, unique
in-range tokens, keep protected tokens, be the identity at keep == N, be deterministic, batch-consistent and
independent of the input precision. Merging plans must conserve tokens and average exactly. A temporal method
(``Method.temporal``) gets a video's (T, H, W) grid with frames no larger than the budget (tests.helpers.video_grid);
a variant marked video gives one to a spatial method too.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from tests.helpers import with_grid

D = 32  # feature size
V = 4  # vision layers in cls_attention_layers

# Every registered method with its defaults, plus a few non-default configurations; video: given a (T, H, W) grid
# (temporal methods always are).
VARIANTS = [pytest.param(name, {}, False, id=name) for name in vtc.list_methods("pre")] + [
    pytest.param("dart", {"merge": True}, False, id="dart-merge"),
    pytest.param("dart", {"num_pivots": 1}, False, id="dart-pivots1"),
    pytest.param("dart", {"num_pivots": 3, "merge": True}, False, id="dart-pivots3-merge"),
    pytest.param("vtc_cls", {"start_layer": 0}, False, id="vtc_cls-start0"),
    pytest.param("vtc_cls", {"start_layer": -1}, False, id="vtc_cls-start-1"),
    pytest.param("random", {"seed": 7}, False, id="random-seed7"),
    pytest.param("uniform", {}, True, id="uniform-video"),
    pytest.param("divprune", {}, True, id="divprune-video"),
]

SHAPES = [(1, 1), (3, 1), (1, 63), (2, 63), (3, 576), (2, 577)]
SHAPE_IDS = [f"B{b}-N{n}" for b, n in SHAPES]
# Batched shapes with enough tokens for partial budgets and protected tokens.
BIG_SHAPES = [(2, 63), (3, 577)]
BIG_SHAPE_IDS = [f"B{b}-N{n}" for b, n in BIG_SHAPES]

BUDGETS = ["one", "tenth", "half", "all-but-one", "all"]


def keep_for(budget: str, n: int) -> int:
    return {
        "one": 1,
        "tenth": max(1, n // 10),
        "half": max(1, n // 2),
        "all-but-one": max(1, n - 1),
        "all": n,
    }[budget]


def make_signals(b: int, n: int, *, seed: int = 0, d: int = D, v: int = V) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(b, n, d, generator=g),
        "cls_attention": torch.randn(b, n, generator=g).softmax(-1),
        "cls_attention_layers": torch.randn(b, v, n, generator=g).softmax(-1),
    }


def signals_for(
    name: str, options: dict, video: bool, b: int, n: int, keep: int | None = None, *, seed: int = 0
) -> dict:
    """make_signals, plus a video grid for a temporal method or a video variant (frames of at most keep tokens)."""
    return with_grid(make_signals(b, n, seed=seed), method_of(name, options), video, keep)


def usable(name: str, b: int, n: int) -> dict:
    """make_signals that method ``name`` can plan with (a video grid if it is temporal), for the error tests."""
    return with_grid(make_signals(b, n), vtc.get_method(name))


def make_protected(b: int, n: int, keep: int, *, seed: int = 1) -> torch.Tensor:
    """[b, n] bool with a different count per row, all <= keep: keep, a random count, 0, ..."""
    g = torch.Generator().manual_seed(seed)
    protected = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        count = [keep, int(torch.randint(0, keep + 1, (1,), generator=g)), 0][row % 3]
        protected[row, torch.randperm(n, generator=g)[:count]] = True
    return protected


def method_of(name: str, options: dict) -> vtc.Method:
    return vtc.get_method(name, **options)


def check_indices(kept: torch.Tensor, b: int, n: int, keep: int) -> None:
    assert kept.dtype == torch.long
    assert kept.shape == (b, keep)
    assert int(kept.min()) >= 0 and int(kept.max()) < n
    assert (kept.diff(dim=1) > 0).all(), "kept indices must be strictly increasing (sorted, unique)"


def check_merge(plan: vtc.Plan, features: torch.Tensor) -> None:
    """Merging plan: tokens conserved, kept tokens target their own slot, groups are size-weighted means."""
    b, n, _ = features.shape
    k = plan.kept.shape[1]
    merge_into = plan.merge_into
    assert merge_into.shape == (b, n)
    assert int(merge_into.min()) >= 0 and int(merge_into.max()) < k
    assert torch.equal(merge_into.gather(1, plan.kept), torch.arange(k).expand(b, k))
    sizes = plan.sizes
    assert torch.equal(sizes.sum(dim=1), torch.full((b,), n))
    assert (sizes >= 1).all()
    merged = plan.apply(features)
    assert merged.shape == (b, k, features.shape[2])
    # Group means through a one-hot membership matrix [B, N, K], in fp64.
    members = torch.nn.functional.one_hot(merge_into, k).double()
    assert torch.equal(members.sum(dim=1).long(), sizes)
    expected = members.transpose(1, 2) @ features.double() / sizes.unsqueeze(-1).double()
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)


# --- the core matrix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("b", "n"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("name", "options", "video"), VARIANTS)
def test_select_and_plan(name, options, video, b, n, budget):
    keep = keep_for(budget, n)
    signals = signals_for(name, options, video, b, n, keep)
    method = method_of(name, options)

    kept = vtc.select(method, keep=keep, **signals)
    check_indices(kept, b, n, keep)

    plan = method_of(name, options).plan(dict(signals), keep)
    assert isinstance(plan, vtc.Plan)
    assert plan.num_tokens == n
    assert torch.equal(plan.kept, kept), "select() and plan().kept disagree"
    assert plan.is_identity == (keep == n)
    if keep == n:
        assert torch.equal(kept, torch.arange(n).expand(b, n))
        assert plan.merge_into is None
        assert torch.equal(plan.apply(signals["features"]), signals["features"]), "keep-all must be bit-exact"
    elif plan.merge_into is not None:
        check_merge(plan, signals["features"])
    else:
        assert torch.equal(plan.sizes, torch.ones(b, keep, dtype=torch.long))
        assert torch.equal(plan.apply(signals["features"]), signals["features"][torch.arange(b)[:, None], kept])


@pytest.mark.parametrize("ratio", [0.001, 0.098, 0.5, 1.0, 1])
@pytest.mark.parametrize(("b", "n"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("name", "options", "video"), VARIANTS)
def test_ratio_budget(name, options, video, b, n, ratio):
    expected = max(1, round(ratio * n))
    signals = signals_for(name, options, video, b, n, expected)
    kept = vtc.select(method_of(name, options), ratio=ratio, **signals)
    check_indices(kept, b, n, expected)
    assert torch.equal(kept, vtc.select(method_of(name, options), keep=expected, **signals))
    if expected == n:
        assert torch.equal(kept, torch.arange(n).expand(b, n))


@pytest.mark.parametrize("budget", ["one", "tenth", "half", "all"])
@pytest.mark.parametrize(("b", "n"), [(1, 1), (3, 63), (3, 577)], ids=["B1-N1", "B3-N63", "B3-N577"])
@pytest.mark.parametrize(("name", "options", "video"), VARIANTS)
def test_protected_tokens_are_kept(name, options, video, b, n, budget):
    keep = keep_for(budget, n)
    signals = signals_for(name, options, video, b, n, keep)
    protected = make_protected(b, n, keep)
    assert int(protected.sum(1).max()) == keep  # row 0 is fully protected: the hardest case

    plan = method_of(name, options).plan({**signals, "protected": protected}, keep)
    check_indices(plan.kept, b, n, keep)
    kept_mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, plan.kept, True)
    assert not (protected & ~kept_mask).any(), "a protected token was dropped"
    if plan.merge_into is not None and keep < n:
        check_merge(plan, signals["features"])

    selected = vtc.select(method_of(name, options), keep=keep, protected=protected, **signals)
    assert torch.equal(selected, plan.kept)


@pytest.mark.parametrize(("b", "n"), BIG_SHAPES, ids=BIG_SHAPE_IDS)
@pytest.mark.parametrize(("name", "options", "video"), VARIANTS)
def test_protected_as_int_mask(name, options, video, b, n):
    signals = signals_for(name, options, video, b, n, 5)
    protected = make_protected(b, n, 5)
    as_bool = vtc.select(method_of(name, options), keep=5, protected=protected, **signals)
    as_int = vtc.select(method_of(name, options), keep=5, protected=protected.long(), **signals)
    assert torch.equal(as_bool, as_int)


@pytest.mark.parametrize(("b", "n"), BIG_SHAPES, ids=BIG_SHAPE_IDS)
@pytest.mark.parametrize(("name", "options", "video"), VARIANTS)
def test_deterministic(name, options, video, b, n):
    keep = n // 4
    signals = signals_for(name, options, video, b, n, keep)
    first = method_of(name, options).plan(dict(signals), keep)
    second = method_of(name, options).plan(signals_for(name, options, video, b, n, keep), keep)  # fresh, fresh
    third = vtc.select(method_of(name, options), keep=keep, **signals)
    assert torch.equal(first.kept, second.kept)
    assert torch.equal(first.kept, third)
    if first.merge_into is not None:
        assert torch.equal(first.merge_into, second.merge_into)


@pytest.mark.parametrize("protect", [False, True], ids=["plain", "protected"])
@pytest.mark.parametrize(("b", "n"), BIG_SHAPES, ids=BIG_SHAPE_IDS)
@pytest.mark.parametrize(("name", "options", "video"), VARIANTS)
def test_batch_equals_rows_alone(name, options, video, b, n, protect):
    keep = n // 4
    signals = signals_for(name, options, video, b, n, keep)
    if protect:
        # Row 0 protects all but 3 of its budget, the other rows fewer: a row's selection must not depend on
        # how many tokens the other rows protect.
        signals["protected"] = make_protected(b, n, keep - 3)
    batch = method_of(name, options).plan(dict(signals), keep)
    # Random draws one [B, N] block from its seed: only the first row is shared with a batch of one.
    rows = [0] if name == "random" else range(b)
    for row in rows:
        alone = method_of(name, options).plan(
            {k: v[row : row + 1] if k != "grid" else v for k, v in signals.items()}, keep
        )
        assert torch.equal(batch.kept[row : row + 1], alone.kept), f"row {row} differs from its own selection"
        if batch.merge_into is not None:
            assert torch.equal(batch.merge_into[row : row + 1], alone.merge_into)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("b", "n"), BIG_SHAPES, ids=BIG_SHAPE_IDS)
@pytest.mark.parametrize(("name", "options", "video"), VARIANTS)
def test_low_precision_equals_fp32_upcast(name, options, video, b, n, dtype):
    keep = n // 4
    low = {k: v.to(dtype) if k != "grid" else v for k, v in signals_for(name, options, video, b, n, keep).items()}
    up = {k: v.float() if k != "grid" else v for k, v in low.items()}
    plan_low = method_of(name, options).plan(dict(low), keep)
    plan_up = method_of(name, options).plan(dict(up), keep)
    assert torch.equal(plan_low.kept, plan_up.kept)
    if plan_up.merge_into is not None:
        assert torch.equal(plan_low.merge_into, plan_up.merge_into)
    assert torch.equal(vtc.select(method_of(name, options), keep=keep, **low), plan_up.kept)


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_keep_above_n_is_rejected(name):
    signals = usable(name, 2, 63)
    with pytest.raises(ValueError, match=r"keep=64 exceeds the 63 visual tokens"):
        vtc.select(name, keep=64, **signals)
    with pytest.raises(ValueError, match=r"keep must be in \[1, 63\]"):
        vtc.get_method(name).plan(signals, 64)


@pytest.mark.parametrize("keep", [0, -3, True, 2.0, "4"])
@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_invalid_keep_is_rejected(name, keep):
    with pytest.raises(ValueError, match=r"keep must be an int >= 1"):
        vtc.select(name, keep=keep, **usable(name, 1, 63))


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_plan_keep_zero_is_rejected(name):
    with pytest.raises(ValueError, match=r"keep must be in \[1, 63\].*got 0"):
        vtc.get_method(name).plan(usable(name, 1, 63), 0)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.5"])
@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_invalid_ratio_is_rejected(name, ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        vtc.select(name, ratio=ratio, **usable(name, 1, 63))


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_keep_and_ratio_exclusive(name):
    signals = usable(name, 1, 63)
    with pytest.raises(ValueError, match=r"exactly one of keep=.*ratio="):
        vtc.select(name, keep=4, ratio=0.5, **signals)
    with pytest.raises(ValueError, match=r"exactly one of keep=.*ratio="):
        vtc.select(name, **signals)


def test_unknown_method_lists_known_methods():
    with pytest.raises(ValueError, match=r"unknown method 'no_such_method'; known methods: \[") as info:
        vtc.select("no_such_method", keep=1, **make_signals(1, 4))
    for name in vtc.list_methods("pre"):
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match=r"Did you mean 'divprune'\?"):
        vtc.get_method("divprun")


def test_unknown_method_option_is_rejected():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\] for method 'dart'"):
        vtc.get_method("dart", bogus=1)


REQUIRED = [(name, signal) for name in vtc.list_methods("pre") for signal in vtc.get_method(name).requires]


@pytest.mark.parametrize(("name", "missing"), REQUIRED, ids=[f"{n}-{s}" for n, s in REQUIRED])
def test_missing_required_signal_is_named(name, missing):
    signals = usable(name, 2, 63)
    del signals[missing]
    if not signals:  # the method needs every signal we have; give it nothing tensor-like at all
        pytest.skip("no signal left to pass")
    with pytest.raises(ValueError, match=rf"method '{name}' needs signal\(s\) \['{missing}'\]"):
        vtc.select(name, keep=4, **signals)
    with pytest.raises(ValueError, match=rf"needs signal\(s\) \['{missing}'\]"):
        vtc.get_method(name).plan(signals, 4)


@pytest.mark.parametrize("name", [n for n in vtc.list_methods("pre") if not vtc.get_method(n).requires])
def test_no_tensor_signal_is_rejected(name):
    with pytest.raises(ValueError, match=rf"method '{name}' got no tensor signal"):
        vtc.select(name, keep=1)


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_unknown_signal_is_rejected(name):
    with pytest.raises(ValueError, match=r"unknown signal\(s\) \['attention_mask'\]; known signals"):
        vtc.select(name, keep=4, attention_mask=torch.ones(2, 63), **usable(name, 2, 63))
    # Method options passed as signals get a pointer to get_method.
    with pytest.raises(ValueError, match=r"unknown signal\(s\) \['merge'\].*vtc.get_method"):
        vtc.select(name, keep=4, merge=True, **usable(name, 2, 63))


MISMATCHES = {
    "tokens": lambda s: {**s, "cls_attention": s["cls_attention"][:, :-1]},
    "batch": lambda s: {**s, "cls_attention_layers": s["cls_attention_layers"][:1]},
    "protected": lambda s: {**s, "protected": torch.zeros(2, 62, dtype=torch.bool)},
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_mismatched_signal_shapes_are_rejected(name, mismatch):
    signals = MISMATCHES[mismatch](usable(name, 2, 63))
    with pytest.raises(ValueError, match=r"signals disagree on \[batch, tokens\]"):
        vtc.select(name, keep=4, **signals)


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_wrong_rank_and_dtype_are_rejected(name):
    signals = usable(name, 2, 63)
    with pytest.raises(ValueError, match=r"signal 'features' must be a 3-D tensor"):
        vtc.select(name, keep=4, **{**signals, "features": signals["features"][0]})
    with pytest.raises(ValueError, match=r"signal 'cls_attention' must be a floating-point tensor"):
        vtc.select(name, keep=4, **{**signals, "cls_attention": torch.ones(2, 63, dtype=torch.long)})


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_grid_must_cover_tokens(name):
    with pytest.raises(ValueError, match=r"grid \(8, 8\) does not cover the 63 visual tokens"):
        vtc.select(name, keep=4, grid=(8, 8), **make_signals(2, 63))


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_more_protected_than_keep_is_rejected(name):
    signals = usable(name, 2, 63)
    protected = torch.zeros(2, 63, dtype=torch.bool)
    protected[1, :5] = True
    with pytest.raises(ValueError, match=r"5 tokens are protected but only keep=4 are kept"):
        vtc.select(name, keep=4, protected=protected, **signals)
    with pytest.raises(ValueError, match=r"5 tokens are protected but only keep=4 are kept"):
        vtc.get_method(name).plan({**signals, "protected": protected}, 4)


BAD_GRIDS = [(63,), (1, 7, 9, 1), (0, 63), (7, 9.0), (True, 63), "79", 63]


@pytest.mark.parametrize("grid", BAD_GRIDS, ids=[repr(g) for g in BAD_GRIDS])
@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_malformed_grid_is_rejected(name, grid):
    with pytest.raises(ValueError, match=r"signal 'grid' must be \(H, W\) for an image or \(T, H, W\) for a video"):
        vtc.select(name, keep=4, grid=grid, **make_signals(2, 63))


@pytest.mark.parametrize("name", vtc.list_methods("pre"))
def test_video_grid_must_cover_tokens(name):
    with pytest.raises(ValueError, match=r"grid \(2, 4, 8\) does not cover the 63 visual tokens"):
        vtc.select(name, keep=4, grid=(2, 4, 8), **make_signals(2, 63))


TEMPORAL = [name for name in vtc.list_methods("pre") if vtc.get_method(name).temporal]


def test_temporal_methods_are_known():
    assert TEMPORAL == ["evs"]  # the list the next test runs over is not empty


@pytest.mark.parametrize("batch", [2, 0], ids=["B2", "empty"])
@pytest.mark.parametrize(("grid", "given"), [(None, "no grid"), ((7, 9), r"the 2-D grid \(7, 9\)")], ids=["none", "2d"])
@pytest.mark.parametrize("name", TEMPORAL)
def test_temporal_method_needs_a_video_grid(name, grid, given, batch):
    """Refused before any planning: at keep == N (the identity) and on an empty batch too."""
    signals = {**make_signals(batch, 63), "grid": grid}
    message = (
        rf"method '{name}' is temporal: it needs a video unit with a \(T, H, W\) grid .*got {given}\. "
        r"Images and video_budget='per_frame' hand \(H, W\) grids and cannot use it"
    )
    for keep in (21, 63):
        with pytest.raises(ValueError, match=message):
            vtc.select(name, keep=keep, **signals)
        with pytest.raises(ValueError, match=message):
            vtc.get_method(name).plan(signals, keep)
    assert vtc.select(name, keep=63, **{**signals, "grid": (3, 3, 7)}).shape == (batch, 63)
