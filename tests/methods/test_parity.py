"""Parity of every method with an independent, straightforward implementation of its paper's algorithm.

The references below are written from the papers (as summarised in the method docstrings), one image at a
time with plain loops, and share no code with vtc. Inputs are random continuous values, so ties do not
occur and kept indices must agree exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import vtc

D = 64
SEEDS = [0, 1, 2]
SIZES = [576, 500]  # the LLaVA-1.5 grid and a non-square token count
CASES = [(seed, n) for seed in SEEDS for n in SIZES]
CASE_IDS = [f"seed{seed}-N{n}" for seed, n in CASES]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def attention(*shape: int, seed: int) -> torch.Tensor:
    return randn(*shape, seed=seed).softmax(-1)


def top_k_sorted(score: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, in original order."""
    order = sorted(range(len(score)), key=lambda i: -score[i])
    return sorted(order[:k])


def cosine_to(x: torch.Tensor, i: int) -> list[float]:
    """Cosine similarity of every row of x [N, D] to row i."""
    return ((x @ x[i]) / (x.norm(dim=1) * x[i].norm())).tolist()


# --- FasterVLM ---------------------------------------------------------------------------------------------


def fastervlm_reference(cls_attention: torch.Tensor, k: int) -> list[int]:
    """Top-k of the [CLS] attention row, back in raster order."""
    return top_k_sorted(cls_attention.tolist(), k)


@pytest.mark.parametrize("k", [1, 36, 64, 144, 300])
@pytest.mark.parametrize(("seed", "n"), CASES, ids=CASE_IDS)
def test_fastervlm_matches_reference(seed, n, k):
    cls_attention = attention(2, n, seed=seed)
    kept = vtc.select("fastervlm", keep=k, cls_attention=cls_attention)
    for row in range(2):
        assert kept[row].tolist() == fastervlm_reference(cls_attention[row], k)


# --- VTC-CLS -----------------------------------------------------------------------------------------------


def vtc_cls_reference(layers: torch.Tensor, k: int, start_layer: int | None) -> list[int]:
    """Top-k of the [CLS] attention summed over vision layers start..V-1 (one image, [V, N])."""
    v, n = layers.shape
    if start_layer is None:
        start = min(v - 1, round(16 / 23 * v))
    elif start_layer < 0:
        start = v + start_layer
    else:
        start = start_layer
    rows = layers.tolist()
    score = [0.0] * n
    for layer in range(start, v):
        for i in range(n):
            score[i] += rows[layer][i]
    return top_k_sorted(score, k)


@pytest.mark.parametrize(
    ("v", "start_layer"),
    [(23, None), (23, 16), (23, 0), (23, 22), (23, -1), (23, -7), (23, -23), (4, None), (4, 1), (4, -2), (2, None)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("k", [1, 36, 144])
@pytest.mark.parametrize(("seed", "n"), CASES[:2], ids=CASE_IDS[:2])
def test_vtc_cls_matches_reference(seed, n, k, v, start_layer):
    layers = attention(1, v, n, seed=seed)
    method = vtc.get_method("vtc_cls", start_layer=start_layer)
    kept = vtc.select(method, keep=k, cls_attention_layers=layers)
    assert kept[0].tolist() == vtc_cls_reference(layers[0], k, start_layer)


@pytest.mark.parametrize(("v", "expected"), [(23, 16), (24, 17), (4, 3), (2, 1), (1, 0), (32, 22)])
def test_vtc_cls_default_start_layer(v, expected):
    """Default start = round(16/23 * V) clamped to V-1: 16 for CLIP-L/336 up to its penultimate layer."""
    assert vtc.get_method("vtc_cls").first_layer(v) == expected
    layers = attention(1, v, 576, seed=v)
    only_from = torch.zeros_like(layers)
    only_from[:, expected:] = layers[:, expected:]
    kept = vtc.select("vtc_cls", keep=36, cls_attention_layers=layers)
    assert kept[0].tolist() == top_k_sorted(only_from[0].sum(0).tolist(), 36)


@pytest.mark.parametrize("start_layer", [4, 5, -5, -100])
def test_vtc_cls_start_layer_out_of_range(start_layer):
    layers = attention(1, 4, 63, seed=0)
    with pytest.raises(ValueError, match=rf"start_layer={start_layer} is outside the 4 vision layers.*-4\.\.3"):
        vtc.select(vtc.get_method("vtc_cls", start_layer=start_layer), keep=4, cls_attention_layers=layers)


# --- DivPrune ----------------------------------------------------------------------------------------------


def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """The DivPrune paper form (vbdi/divprune), one image [N, D]: full N x N distance matrix, greedy max-min."""
    normed = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - normed @ normed.t()  # fp32, d(i, j) = 1 - cos
    selected: list[int] = []
    for step in range(k):
        if step == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]  # nearest-neighbour distance
        else:
            scores = torch.min(dist[selected], dim=0).values
        selected.append(int(torch.argmax(scores)))
    return sorted(selected)


@pytest.mark.parametrize("k", [1, 8, 56, 64, 300])
@pytest.mark.parametrize(("seed", "n"), CASES, ids=CASE_IDS)
def test_divprune_matches_paper_form(seed, n, k):
    features = randn(1, n, D, seed=seed)
    kept = vtc.select("divprune", keep=k, features=features)
    assert kept[0].tolist() == divprune_reference(features[0], k)


def test_divprune_batch_matches_paper_form():
    features = randn(3, 577, D, seed=5)
    kept = vtc.select("divprune", keep=56, features=features)
    for row in range(3):
        assert kept[row].tolist() == divprune_reference(features[row], 56)


def test_divprune_paper_ratio():
    features = randn(1, 576, D, seed=3)
    kept = vtc.select("divprune", ratio=0.098, features=features)
    assert kept.shape == (1, 56)
    assert kept[0].tolist() == divprune_reference(features[0], 56)


# --- DART --------------------------------------------------------------------------------------------------


def dart_reference(x: torch.Tensor, k: int, num_pivots: int = 8) -> list[int]:
    """DART's pre-LLM form, one image [N, D]: pivots by L1 norm, then the least-similar tokens per pivot."""
    n = x.shape[0]
    p = min(num_pivots, k)
    norms = [float(x[i].abs().sum()) for i in range(n)]
    pivots = sorted(range(n), key=lambda i: -norms[i])[:p]  # descending norm order
    chosen = list(pivots)
    rest = k - p
    for j, pivot in enumerate(pivots):
        count = rest // p + (1 if j < rest % p else 0)
        sims = cosine_to(x, pivot)
        for i in sorted(range(n), key=lambda i: sims[i]):  # lowest similarity first
            if count == 0:
                break
            if i not in chosen:
                chosen.append(i)
                count -= 1
    assert len(chosen) == k == len(set(chosen))
    return sorted(chosen)


def dart_merge_reference(x: torch.Tensor, kept: list[int]) -> tuple[list[int], torch.Tensor]:
    """Every token goes to its most cosine-similar kept token (kept tokens to themselves); group means."""
    targets = []
    for i in range(x.shape[0]):
        if i in kept:
            targets.append(kept.index(i))
        else:
            sims = cosine_to(x, i)
            targets.append(max(range(len(kept)), key=lambda s: sims[kept[s]]))
    merged = torch.zeros(len(kept), x.shape[1], dtype=torch.float64)
    sizes = [0] * len(kept)
    for i, slot in enumerate(targets):
        merged[slot] += x[i].double()
        sizes[slot] += 1
    for slot, size in enumerate(sizes):
        merged[slot] /= size
    return targets, merged


@pytest.mark.parametrize(("k", "num_pivots"), [(1, 8), (5, 8), (8, 8), (9, 8), (64, 8), (300, 8), (64, 1), (64, 3)])
@pytest.mark.parametrize(("seed", "n"), CASES[:4], ids=CASE_IDS[:4])
def test_dart_matches_reference(seed, n, k, num_pivots):
    features = randn(1, n, D, seed=seed)
    kept = vtc.select(vtc.get_method("dart", num_pivots=num_pivots), keep=k, features=features)
    assert kept[0].tolist() == dart_reference(features[0], k, num_pivots)


def test_dart_keeps_exactly_k_not_the_originals_count():
    """The original keeps 4 + 8 * floor(M / 8) (132 for "128"); vtc keeps exactly keep."""
    features = randn(1, 576, D, seed=0)
    assert vtc.select("dart", keep=128, features=features).shape == (1, 128)
    assert vtc.select("dart", keep=131, features=features).shape == (1, 131)


@pytest.mark.parametrize("k", [8, 20, 64])
@pytest.mark.parametrize(("seed", "n"), CASES[:2], ids=CASE_IDS[:2])
def test_dart_merge_matches_reference(seed, n, k):
    features = randn(1, n, D, seed=seed)
    plan = vtc.get_method("dart", merge=True).plan({"features": features}, k)
    kept = plan.kept[0].tolist()
    assert kept == dart_reference(features[0], k)  # merging does not change which tokens are kept
    targets, merged = dart_merge_reference(features[0], kept)
    assert plan.merge_into[0].tolist() == targets
    torch.testing.assert_close(plan.apply(features)[0].double(), merged, rtol=1e-5, atol=1e-5)
    assert plan.sizes[0].tolist() == [targets.count(slot) for slot in range(k)]


# --- Random ------------------------------------------------------------------------------------------------


def test_random_same_seed_same_indices():
    features = randn(2, 576, 4, seed=0)
    first = vtc.select(vtc.get_method("random", seed=3), keep=64, features=features)
    second = vtc.select(vtc.get_method("random", seed=3), keep=64, features=randn(2, 576, 4, seed=9))
    assert torch.equal(first, second)  # the draw depends on the seed and shape only


def test_random_different_seed_different_indices():
    features = randn(1, 576, 4, seed=0)
    draws = {
        tuple(vtc.select(vtc.get_method("random", seed=s), keep=64, features=features)[0].tolist()) for s in range(5)
    }
    assert len(draws) == 5


def test_random_default_seed_is_zero():
    features = randn(1, 576, 4, seed=0)
    assert torch.equal(
        vtc.select("random", keep=64, features=features),
        vtc.select(vtc.get_method("random", seed=0), keep=64, features=features),
    )


def test_random_is_roughly_uniform():
    """Over many seeds every token is kept with frequency about keep / N (loose, ~6 standard deviations)."""
    n, keep, seeds = 16, 4, 1000
    features = torch.zeros(1, n, 2)
    counts = torch.zeros(n)
    for seed in range(seeds):
        counts[vtc.select(vtc.get_method("random", seed=seed), keep=keep, features=features)[0]] += 1
    frequency = counts / seeds
    assert counts.sum() == keep * seeds
    assert ((frequency - keep / n).abs() < 0.08).all(), frequency


# --- Uniform -----------------------------------------------------------------------------------------------


def rows_and_columns(kept: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kept // width, kept % width


def test_uniform_8x8_lattice_on_24x24():
    kept = vtc.select("uniform", keep=64, features=torch.zeros(1, 576, 4))[0]
    rows, cols = rows_and_columns(kept, 24)
    distinct_rows, distinct_cols = rows.unique(), cols.unique()
    assert len(distinct_rows) == len(distinct_cols) == 8
    assert len(distinct_rows.diff().unique()) == 1, "rows not evenly spaced"
    assert len(distinct_cols.diff().unique()) == 1, "columns not evenly spaced"
    assert int(distinct_rows.diff()[0]) == int(distinct_cols.diff()[0]) == 3
    for r in distinct_rows:
        assert torch.equal(cols[rows == r], distinct_cols), "every lattice row holds the same columns"


def check_spread(axis: torch.Tensor, length: int) -> None:
    """Distinct kept coordinates along one axis leave no gap (inner or at a border) wider than a cell + 1."""
    distinct = axis.unique()
    limit = math.ceil(length / len(distinct)) + 1
    assert int(distinct[0]) < limit
    assert length - 1 - int(distinct[-1]) < limit
    if len(distinct) > 1:
        assert int(distinct.diff().max()) <= limit


@pytest.mark.parametrize("keep", [1, 2, 9, 16, 36, 50, 100, 144, 200, 288, 400, 575])
@pytest.mark.parametrize(("height", "width"), [(24, 24), (12, 48), (48, 12), (18, 32), (1, 576)])
def test_uniform_spread(height, width, keep):
    n = height * width
    grid = None if height == width else (height, width)
    kept = vtc.select("uniform", keep=keep, features=torch.zeros(1, n, 4), grid=grid)[0]
    assert kept.numel() == keep and len(kept.unique()) == keep
    rows, cols = rows_and_columns(kept, width)
    check_spread(rows, height)
    check_spread(cols, width)


@pytest.mark.parametrize("keep", [1, 7, 64, 100, 287])
@pytest.mark.parametrize(("height", "width"), [(12, 24), (24, 12), (7, 41), (1, 288)])
def test_uniform_non_square_grid_count_exact(height, width, keep):
    n = height * width
    features = randn(2, n, 4, seed=0)
    kept = vtc.select("uniform", keep=min(keep, n), features=features, grid=(height, width))
    assert kept.shape == (2, min(keep, n))
    assert (kept.diff(dim=1) > 0).all()
    assert torch.equal(kept[0], kept[1])  # no signal used: every image gets the same lattice


def test_uniform_non_square_n_without_grid_is_one_row():
    kept = vtc.select("uniform", keep=10, features=torch.zeros(1, 100 - 1, 4))[0]
    gaps = kept.diff()
    assert int(gaps.max()) - int(gaps.min()) <= 1  # evenly spaced along the single row


def test_fastervlm_on_attention_received_is_its_top_k_and_never_falls_back_to_cls():
    scores = torch.rand(3, 50, generator=torch.Generator().manual_seed(4))
    method = vtc.get_method("fastervlm", signal="attention_received")
    kept = vtc.select(method, keep=7, attention_received=scores)
    assert torch.equal(kept, scores.topk(7, dim=1).indices.sort(dim=1).values)
    with pytest.raises(ValueError, match=r"needs signal\(s\) \['attention_received'\]"):
        vtc.select(method, keep=7, cls_attention=scores)


# --- Uniform on a video ------------------------------------------------------------------------------------


def uniform_video_reference(frames: int, height: int, width: int, keep: int) -> list[int]:
    """Frame t keeps keep // T tokens, the first keep % T frames one more, each share chosen as uniform chooses on
    one H x W image; indices offset by t * H * W."""
    kept: list[int] = []
    for t in range(frames):
        share = keep // frames + (1 if t < keep % frames else 0)
        if share == 0:
            continue
        image = vtc.select("uniform", keep=share, features=torch.zeros(1, height * width, 1), grid=(height, width))
        kept += [t * height * width + i for i in image[0].tolist()]
    return sorted(kept)


@pytest.mark.parametrize("keep", [1, 3, 7, 8, 50, 95, 96, 191, 192])
@pytest.mark.parametrize(("frames", "height", "width"), [(8, 4, 6), (3, 8, 8), (2, 1, 96)], ids=lambda x: str(x))
def test_uniform_video_matches_reference(frames, height, width, keep):
    n = frames * height * width
    keep = min(keep, n)
    kept = vtc.select("uniform", keep=keep, features=randn(2, n, 4, seed=0), grid=(frames, height, width))
    expected = uniform_video_reference(frames, height, width, keep)
    assert kept[0].tolist() == kept[1].tolist() == expected


def test_uniform_video_spreads_over_frames():
    """keep=10 over 4 frames of 3 x 3: 3, 3, 2, 2 tokens; a keep below T leaves the last frames empty."""
    kept = vtc.select("uniform", keep=10, features=torch.zeros(1, 36, 1), grid=(4, 3, 3))[0]
    assert torch.bincount(kept // 9, minlength=4).tolist() == [3, 3, 2, 2]
    kept = vtc.select("uniform", keep=2, features=torch.zeros(1, 36, 1), grid=(4, 3, 3))[0]
    assert torch.bincount(kept // 9, minlength=4).tolist() == [1, 1, 0, 0]
    assert kept.tolist() == [4, 13]  # each the centre of its 3 x 3 frame


# --- EVS (vLLM's Efficient Video Sampling) -----------------------------------------------------------------


def evs_reference(
    x: torch.Tensor, frames: int, height: int, width: int, keep: int, protected: tuple[int, ...] = ()
) -> list[int]:
    """vLLM's compute_retention_mask (vllm/multimodal/evs.py) for one video [T*H*W, D], with plain loops: each token
    scores 1 - cos to the same (h, w) of the previous frame, the first frame 255; a stable descending sort (ties
    to the lower flat index: earlier frame, then raster order); the first ``keep`` survive, in original order.
    ``protected`` tokens (vtc's addition) rank first."""
    per_frame = height * width
    rows = x.double()
    score = []
    for i in range(frames * per_frame):
        if i < per_frame:
            score.append(255.0)
            continue
        a, b = rows[i], rows[i - per_frame]
        cosine = float(a @ b) / (max(float(a.norm()), 1e-8) * max(float(b.norm()), 1e-8))
        score.append(1.0 - cosine)
    for i in protected:
        score[i] = math.inf
    order = sorted(range(len(score)), key=lambda i: -score[i])  # Python's sort is stable
    return sorted(order[:keep])


def one_hot_video(b: int, frames: int, per_frame: int, d: int, *, seed: int) -> torch.Tensor:
    """[b, T*HW, d] tokens that are scaled one-hot vectors over 3 directions, with frame 2 a copy of frame 1: every
    cosine is exactly 0 or 1, so dissimilarities tie in large groups and only the stable order decides."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randint(0, 3, (b, frames * per_frame), generator=g)
    scale = 2.0 ** torch.randint(0, 4, (b, frames * per_frame), generator=g).float()
    x = torch.nn.functional.one_hot(direction, d).float() * scale.unsqueeze(-1)
    if frames > 2:
        x[:, 2 * per_frame : 3 * per_frame] = x[:, per_frame : 2 * per_frame]
    return x


EVS_GRIDS = [(2, 3, 4), (4, 6, 6), (8, 4, 6), (5, 1, 7), (16, 12, 12)]
EVS_IDS = ["T{}-H{}-W{}".format(*grid) for grid in EVS_GRIDS]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "tied"])
@pytest.mark.parametrize("grid", EVS_GRIDS, ids=EVS_IDS)
def test_evs_matches_vllm_reference(grid, ties, fraction):
    frames, height, width = grid
    per_frame, n = height * width, frames * height * width
    keep = per_frame + round(fraction * (n - per_frame))
    # Continuous random features do not tie; a copied frame would tie only up to rounding (1 - cos of a token with
    # itself is +-1e-7 in fp32), so the tied case uses scaled one-hot tokens, whose cosines are exactly 0 or 1.
    x = one_hot_video(3, frames, per_frame, 8, seed=frames) if ties else randn(3, n, 16, seed=frames)
    kept = vtc.select("evs", keep=keep, features=x, grid=grid)
    assert kept.shape == (3, keep)
    for row in range(3):
        assert kept[row].tolist() == evs_reference(x[row], *grid, keep), f"row {row}"


@pytest.mark.parametrize("q", [0.0, 0.3, 0.75, 0.99])
def test_evs_with_vllms_kept_count(q):
    """vLLM keeps max(H*W, floor(N * (1 - q))) tokens for pruning rate q: that keep gives its mask."""
    frames, height, width = 6, 4, 5
    n = frames * height * width
    keep = max(height * width, math.floor(n * (1 - q)))
    x = randn(2, n, 16, seed=1)
    kept = vtc.select("evs", keep=keep, features=x, grid=(frames, height, width))
    for row in range(2):
        assert kept[row].tolist() == evs_reference(x[row], frames, height, width, keep)


def test_evs_ties_go_to_the_earlier_frame_then_raster_order():
    """Three identical frames after a different first one: every later token ties at 1 - cos = 0; the survivors
    past the first frame are the first tokens of frame 1 in raster order."""
    first = torch.nn.functional.one_hot(torch.zeros(6, dtype=torch.long), 4).float()
    later = torch.nn.functional.one_hot(torch.ones(6, dtype=torch.long), 4).float()
    x = torch.cat([first, later, later, later]).unsqueeze(0)  # [1, 24, 4]: frame 1 differs from frame 0 (cos 0)
    kept = vtc.select("evs", keep=9, features=x, grid=(4, 2, 3))[0]
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    x[0, 12:18] = first  # frame 2 now differs from frame 1 too: frame 1 and frame 2 tie at 1, frame 1 first
    assert vtc.select("evs", keep=15, features=x, grid=(4, 2, 3))[0].tolist() == [*range(12), 12, 13, 14]


def test_evs_keeps_the_first_frame_and_the_changed_tokens():
    x = randn(1, 3 * 16, 8, seed=0)
    x[0, 16:32] = x[0, :16]  # frame 1 repeats frame 0 ...
    x[0, 16 + 5] = -x[0, 5]  # ... but for token (1, 1), reversed
    x[0, 32:] = x[0, 16:32] * 3  # frame 2 repeats frame 1, scaled (cosine 1)
    x[0, 32 + 10] = randn(8, seed=9)  # but for token (2, 2)
    kept = vtc.select("evs", keep=18, features=x, grid=(3, 4, 4))[0].tolist()
    assert kept == [*range(16), 16 + 5, 32 + 10]


def test_evs_protected_tokens_come_first():
    """Protected tokens (vtc's addition) are kept whatever their frame; the rest of the budget in vLLM's order."""
    x = randn(2, 36, 8, seed=2)
    protected = torch.zeros(2, 36, dtype=torch.bool)
    protected[0, [20, 30, 35]] = True
    kept = vtc.select("evs", keep=14, features=x, grid=(4, 3, 3), protected=protected)
    assert kept[0].tolist() == evs_reference(x[0], 4, 3, 3, 14, protected=(20, 30, 35))
    assert {20, 30, 35} <= set(kept[0].tolist())
    assert kept[1].tolist() == evs_reference(x[1], 4, 3, 3, 14)  # row 1 protects nothing
    # All of the budget protected, first frame included only where protected.
    protected[1, 27:] = True
    protected[1, :5] = True
    assert vtc.select("evs", keep=14, features=x, grid=(4, 3, 3), protected=protected)[1].tolist() == [
        *range(5),
        *range(27, 36),
    ]


def test_evs_refuses_a_keep_below_one_frame():
    x = randn(2, 4 * 6 * 8, 8, seed=0)
    message = (
        r"method 'evs' keeps the whole first frame of a video: keep=47 is below the 48 tokens of one 6 x 8 frame "
        r"\(grid \(4, 6, 8\)\); use keep >= 48"
    )
    with pytest.raises(ValueError, match=message):
        vtc.select("evs", keep=47, features=x, grid=(4, 6, 8))
    with pytest.raises(ValueError, match=message):
        vtc.get_method("evs").plan({"features": x, "grid": (4, 6, 8)}, 47)
    with pytest.raises(ValueError, match=r"keep=1 is below the 48 tokens"):
        vtc.select("evs", ratio=0.001, features=x, grid=(4, 6, 8))
    assert vtc.select("evs", keep=48, features=x, grid=(4, 6, 8)).tolist() == [list(range(48))] * 2


def test_evs_one_frame_is_kept_whole_or_refused():
    x = randn(1, 12, 8, seed=0)
    assert vtc.select("evs", keep=12, features=x, grid=(1, 3, 4)).tolist() == [list(range(12))]
    with pytest.raises(ValueError, match=r"keep=11 is below the 12 tokens of one 3 x 4 frame"):
        vtc.select("evs", keep=11, features=x, grid=(1, 3, 4))


@pytest.mark.parametrize(("grid", "given"), [(None, "no grid"), ((6, 8), r"the 2-D grid \(6, 8\)")], ids=["none", "2d"])
def test_evs_refuses_images(grid, given):
    x = randn(1, 48, 8, seed=0)
    with pytest.raises(ValueError, match=rf"method 'evs' is temporal: .*\(T, H, W\) grid.*got {given}"):
        vtc.select("evs", keep=24, features=x, grid=grid)
