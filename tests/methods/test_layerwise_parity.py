"""Parity of the in-LLM methods with straightforward implementations of their papers.

FastV, PyramidDrop and DART run on tiny 6-layer models with EAGER attention, so the references read the model's
own attention weights (output_attentions, or the layer's attention module called on the layer's input) and
compute keys and norms with plain code written here; the selections are plain loops over Python lists. The
adaptive rule is checked on hand-made Stage objects. No reference shares code with vtc.
"""

from __future__ import annotations

import math

import pytest
import torch

import vtc
from vtc.methods import DARTLLM, Adaptive, FastV, PDrop, Stage
from vtc.tiny import (
    IMAGE_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    tiny_llava,
    tiny_llava_inputs,
    tiny_qwen2_vl,
    tiny_qwen_inputs,
)

DEPTH = 6
N = 576


def top_k_sorted(score: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, in original order."""
    order = sorted(range(len(score)), key=lambda i: -score[i])
    return sorted(order[:k])


def images_of(input_ids: torch.Tensor, mask: torch.Tensor, token: int, sizes: list[int]) -> list[list[int]]:
    """Columns of each image of one row (images of ``sizes`` tokens, in order)."""
    columns = ((input_ids == token) & mask.bool()).nonzero().squeeze(1).tolist()
    assert len(columns) == sum(sizes)
    out, start = [], 0
    for n in sizes:
        out.append(columns[start : start + n])
        start += n
    return out


def text_after_images(input_ids: torch.Tensor, mask: torch.Tensor, token: int) -> list[int]:
    """Valid text columns after the row's last visual token."""
    visual = (input_ids == token).nonzero().squeeze(1)
    last = int(visual.max())
    return [c for c in range(last + 1, input_ids.numel()) if bool(mask[c]) and int(input_ids[c]) != token]


class Recorder:
    """Wraps an in-LLM method instance: records every Stage it is shown and what it chose."""

    def __init__(self, method):
        self.stages: list[tuple[Stage, torch.Tensor]] = []
        choose_all = type(method).choose_all  # what the dropper calls, once per drop layer

        def record(stages):
            chosen = choose_all(method, stages)
            self.stages.extend(zip(stages, chosen, strict=True))
            return chosen

        method.choose_all = record


class LayerInputs:
    """Records (hidden states, keyword arguments) reaching a decoder layer; ``first=True`` runs before vtc's hook."""

    def __init__(self, layer: torch.nn.Module, first: bool = False):
        self.calls: list[tuple[torch.Tensor, dict]] = []
        self._handle = layer.register_forward_pre_hook(self._record, with_kwargs=True, prepend=first)

    def _record(self, module, args, kwargs):
        self.calls.append((args[0] if args else kwargs["hidden_states"], dict(kwargs)))

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def llava():
    model = tiny_llava(text_layers=DEPTH, attn_implementation="eager")
    return model, tiny_llava_inputs(model, images_per_sample=(2, 1), seed=11), [[N, N], [N]]


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen2_vl(text_layers=DEPTH, attn_implementation="eager")
    grids = (((8, 12),), ((8, 8), (4, 6)))
    return model, tiny_qwen_inputs(model, image_grids=grids, seed=11), [[24], [16, 6]]


def case_of(request, name):
    model, inputs, sizes = request.getfixturevalue(name)
    return model, inputs, sizes, IMAGE_TOKEN_ID if name == "llava" else QWEN_IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def attentions(request):
    """Eager attention weights of every layer of the uncompressed models: name -> tuple of [B, H, L, L]."""
    out = {}
    for name in ("llava", "qwen"):
        model, inputs, _, _ = case_of(request, name)
        with torch.no_grad():
            out[name] = model(**inputs, output_attentions=True).attentions
        assert len(out[name]) == DEPTH
    return out


def kept_per_image(kept: torch.Tensor, sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in sizes:
        out.append([i - start for i in kept.tolist() if start <= i < start + n])
        start += n
    return out


# --- FastV ---------------------------------------------------------------------------------------------------


def fastv_reference(weights: torch.Tensor, inputs: dict, sizes: list[list[int]], token: int, keep: int):
    """Per row and image: top-k visual tokens by layer K-1's attention of the last query, mean over heads."""
    row = weights[:, :, -1].mean(1)  # [B, L]
    out = []
    for b, image_sizes in enumerate(sizes):
        columns = images_of(inputs["input_ids"][b], inputs["attention_mask"][b], token, image_sizes)
        out.append([top_k_sorted([float(row[b, c]) for c in cols], keep) for cols in columns])
    return out


@pytest.mark.parametrize(
    ("name", "layer", "keep"),
    [("llava", 2, 64), ("llava", 1, 1), ("llava", 4, 300), ("qwen", 2, 5), ("qwen", 1, 12), ("qwen", 5, 1)],
)
def test_fastv_keeps_the_top_tokens_of_layer_k_minus_1_attention(request, attentions, name, layer, keep):
    model, inputs, sizes, token = case_of(request, name)
    expected = fastv_reference(attentions[name][layer - 1], inputs, sizes, token, keep)
    with vtc.compress(model, FastV(layer=layer), keep=keep) as handle, torch.no_grad():
        model(**inputs)
    for b, image_sizes in enumerate(sizes):
        assert kept_per_image(handle.last_kept[b], image_sizes) == expected[b]


# --- PyramidDrop (and the adaptive method at the model level) -------------------------------------------------


def eager_last_row(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """[B, L] the layer's own eager attention weights of the last query, mean over heads, on ``hidden``."""
    normed = layer.input_layernorm(hidden)
    out = layer.self_attn(
        hidden_states=normed, position_embeddings=kwargs["position_embeddings"], attention_mask=kwargs["attention_mask"]
    )
    return out[1][:, :, -1].mean(1)


def smallest_covering(score: list[float], mass: float, floor: int) -> list[int]:
    """Fewest tokens (by descending score) whose scores sum to at least ``mass`` of the total, at least ``floor``."""
    order = sorted(range(len(score)), key=lambda i: -score[i])
    total, running, count = math.fsum(score), 0.0, 0
    for i in order:
        if running >= mass * total:
            break
        running += score[i]
        count += 1
    return sorted(order[: min(len(score), max(floor, count))])


@pytest.mark.parametrize("name", ["pdrop", "adaptive"])
def test_each_stage_keeps_by_the_drop_layers_own_eager_attention(llava, name):
    """At every drop layer K_s: the signal equals the eager attention weights of layer K_s on the sequence pruned
    by the earlier stages (its input), and the survivors of each image are, for PyramidDrop, the top
    keep / lam^(S-1-s) of them, for the adaptive method, the fewest covering ``mass`` (at least the floor)."""
    model, inputs, sizes = llava
    keep = 40
    method = PDrop() if name == "pdrop" else Adaptive(mass=0.5)
    layers = [2, 3, 4] if name == "pdrop" else [1, 2, 3]
    recorder = Recorder(method)
    decoder = model.model.language_model
    hidden_spies = {k: LayerInputs(decoder.layers[k], first=True) for k in layers}
    with vtc.compress(model, method, keep=keep) as handle:
        kwargs_spies = {k: LayerInputs(decoder.layers[k - 1]) for k in layers if k > 1}
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for spy in [*hidden_spies.values(), *kwargs_spies.values()]:
                spy.remove()
    assert [stage.index for stage, _ in recorder.stages] == [s for s in range(3) for _ in range(3)]
    stages = iter(recorder.stages)
    previous = [[N, N], [N]]
    for s, k in enumerate(layers):
        hidden = hidden_spies[k].calls[0][0]
        # The arguments layer K_s gets: those of layer K_s - 1 after vtc's hook (the sequence does not change
        # between drop layers); layer 0 gets the decoder's own.
        kwargs = kwargs_spies[k].calls[0][1] if k > 1 else hidden_spies[k].calls[0][1]
        with torch.no_grad():
            row = eager_last_row(decoder.layers[k], hidden, kwargs)
        positions = kwargs.get("position_ids")  # a plain forward numbers every column: position = original column
        current = []
        for b in range(2):
            for i in range(len(sizes[b])):
                stage, chosen = next(stages)
                torch.testing.assert_close(stage.signals["last_row"], row[b], rtol=1e-5, atol=1e-7)
                columns = positions.expand(2, -1)[b, stage.visual].tolist()
                image = images_of(inputs["input_ids"][b], inputs["attention_mask"][b], IMAGE_TOKEN_ID, sizes[b])[i]
                assert set(columns) <= set(image)  # the stage shows this image's survivors, in order
                assert columns == sorted(columns)
                assert stage.visual.numel() == previous[b][i]
                score = [float(row[b, p]) for p in stage.visual]
                if name == "pdrop":
                    assert stage.keep == round(keep / 0.5 ** (2 - s))
                    expected = top_k_sorted(score, stage.keep)
                else:
                    assert stage.keep == keep
                    expected = smallest_covering(score, 0.5, keep)
                assert chosen.tolist() == expected
                current.append(len(expected))
        previous = [current[:2], current[2:]]
    assert handle.stats["visual_tokens_per_layer"][1][-1] == previous[1][0]


# --- DART (paper form) -------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def key_l1_norms(decoder: torch.nn.Module, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] L1 norm of every token's key at layer ``index`` (its input norm, k_proj, RoPE), heads concatenated,
    with each row's positions counted from its first real token, as for the sample alone (DART runs batch 1)."""
    config, layer = decoder.config, decoder.layers[index]
    b, length, _ = hidden.shape
    head_dim = config.hidden_size // config.num_attention_heads
    keys = layer.self_attn.k_proj(layer.input_layernorm(hidden))
    keys = keys.view(b, length, config.num_key_value_heads, head_dim).transpose(1, 2)  # [B, KV, L, d]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cos, sin = (t.unsqueeze(1) for t in decoder.rotary_emb(hidden, positions))
    keys = keys * cos + rotate_half(keys) * sin
    return keys.abs().sum(dim=(1, 3))


def cosine(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    )


def dart_reference(norm: list[float], hidden: list[list[float]], image: list[int], text: list[int], keep: int):
    """DART on one image: pivots = the 4 visual (at most keep) and 4 text tokens with the largest key norm; in
    descending norm order, each pivot takes its share of the remaining budget (split evenly, the first pivots one
    more) as the not-yet-chosen visual tokens least cosine-similar to it. Returns kept indices into the image."""
    visual_pivots = sorted(image, key=lambda c: -norm[c])[: min(4, keep)]
    text_pivots = sorted(text, key=lambda c: -norm[c])[:4]
    pivots = sorted(visual_pivots + text_pivots, key=lambda c: -norm[c])
    chosen = set(visual_pivots)
    share, extra = divmod(keep - len(visual_pivots), len(pivots))
    for j, pivot in enumerate(pivots):
        count = share + (1 if j < extra else 0)
        candidates = [c for c in image if c not in chosen]
        similar = sorted(candidates, key=lambda c: cosine(hidden[pivot], hidden[c]))
        chosen.update(similar[:count])
    return sorted(image.index(c) for c in chosen)


@pytest.mark.parametrize(("layer", "keep"), [(2, 40), (2, 3), (4, 203), (1, 17)])
def test_dart_llm_keeps_what_the_papers_greedy_selection_keeps(llava, layer, keep):
    model, inputs, sizes = llava
    decoder = model.model.language_model
    spies = {k: LayerInputs(decoder.layers[k]) for k in (layer - 1, layer)}
    try:
        with torch.no_grad():
            model(**inputs)  # uncompressed: layers K-1 and K see the whole prompt
    finally:
        for spy in spies.values():
            spy.remove()
    hidden_k1, _ = spies[layer - 1].calls[0]
    with torch.no_grad():
        norms = key_l1_norms(decoder, layer - 1, hidden_k1, inputs["attention_mask"])
        features = decoder.norm(spies[layer].calls[0][0])
    with vtc.compress(model, DARTLLM(layer=layer), keep=keep) as handle, torch.no_grad():
        model(**inputs)
    for b, image_sizes in enumerate(sizes):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b]
        norm, hidden = norms[b].tolist(), features[b].double().tolist()
        text = text_after_images(ids, mask, IMAGE_TOKEN_ID)
        expected = [
            dart_reference(norm, hidden, image, text, keep)
            for image in images_of(ids, mask, IMAGE_TOKEN_ID, image_sizes)
        ]
        assert kept_per_image(handle.last_kept[b], image_sizes) == expected


# --- the adaptive rule on hand-made stages ----------------------------------------------------------------------


def stage(scores: list[float], keep: int, visual: list[int] | None = None, length: int | None = None) -> Stage:
    """A Stage whose visual tokens sit at ``visual`` (default 0..n-1) of a row of ``length``; other positions
    (text) get large scores that must not count."""
    visual = visual or list(range(len(scores)))
    length = length or max(visual) + 3
    row = torch.full((length,), 10.0)
    row[visual] = torch.tensor(scores, dtype=torch.float32)
    text = torch.tensor([p for p in range(length) if p > max(visual)])
    return Stage(0, keep, torch.tensor(visual), text, {"last_row": row}, torch.zeros(length, 4))


@pytest.mark.parametrize(
    ("scores", "mass", "floor", "expected"),
    [
        ([0.5, 0.25, 0.125, 0.125], 0.75, 1, [0, 1]),  # the prefix reaches the mass exactly
        ([0.125, 0.5, 0.125, 0.25], 0.75, 1, [1, 3]),  # order is by score, returned sorted
        ([0.125, 0.5, 0.125, 0.25], 0.76, 1, None),  # just above: one more token (either 0.125)
        ([0.125, 0.5, 0.125, 0.25], 0.5, 3, None),  # floor above the prefix: the top 3 (either 0.125)
        ([0.125, 0.5, 0.125, 0.25], 0.5, 9, [0, 1, 2, 3]),  # floor above the image: all
        ([0.5, 0.5, 0.0, 0.0], 1.0, 1, [0, 1]),  # mass 1: every token with attention, no zero ones
        ([0.25, 0.25, 0.25, 0.25], 0.5, 1, None),  # all tied: any 2
        ([0.25, 0.25, 0.25, 0.25], 1.0, 1, [0, 1, 2, 3]),
        ([1.0, 0.0, 0.0], 0.9, 1, [0]),
        ([0.0625] * 16, 0.3, 2, None),  # 0.3 of 1 needs 5 of 16
    ],
)
def test_adaptive_keeps_the_smallest_prefix_covering_the_mass(scores, mass, floor, expected):
    chosen = Adaptive(mass=mass).choose(stage(scores, floor, visual=[2 * i + 1 for i in range(len(scores))]))
    assert torch.equal(chosen, chosen.unique())
    reference = smallest_covering(scores, mass, floor)
    assert len(chosen) == len(reference)
    if expected is not None:
        assert chosen.tolist() == expected == reference
    else:  # ties at the boundary: any of the tied tokens will do, the kept scores are what count
        assert sorted(scores[i] for i in chosen.tolist()) == sorted(scores[i] for i in reference)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mass", [0.1, 0.5, 0.9, 0.99])
def test_adaptive_matches_the_reference_on_random_attention(seed, mass):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(200, generator=generator).pow(4).tolist()  # skewed, like attention
    floor = 10
    chosen = Adaptive(mass=mass).choose(stage(scores, floor, length=230))
    assert chosen.tolist() == smallest_covering(scores, mass, floor)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [1, 4, 11, 30])
def test_dart_llm_visits_all_pivots_in_descending_norm_order(seed, keep):
    """Hand-made stages where text keys are as large as visual ones (in the tiny models the visual keys always win,
    so there the order of visual before text pivots cannot be told apart from the norm order)."""
    generator = torch.Generator().manual_seed(seed)
    n, length = 60, 72
    visual = list(range(3, 3 + n))
    text = list(range(3 + n, length))
    norm = torch.rand(length, generator=generator)
    hidden = torch.randn(length, 16, generator=generator)
    row_stage = Stage(0, keep, torch.tensor(visual), torch.tensor(text), {"key_norm": norm}, hidden)
    chosen = DARTLLM().choose(row_stage)
    expected = dart_reference(norm.tolist(), hidden.double().tolist(), visual, text, keep)
    assert chosen.tolist() == expected


@pytest.mark.parametrize("method", [FastV(), PDrop(), DARTLLM(), Adaptive(mass=0.5)], ids=lambda m: m.name)
def test_choosing_for_a_batch_of_images_equals_choosing_for_each(method):
    """The dropper asks for every image of a batch at once (choose_all: one batched call per group of images with
    the same counts); each image must get exactly what it gets alone, in any mix of shapes."""
    generator = torch.Generator().manual_seed(0)
    stages = []
    for n, keep, text_count in [(40, 8, 5), (40, 8, 5), (40, 9, 5), (30, 8, 5), (40, 8, 2), (40, 8, 5)]:
        length = 3 + n + text_count
        visual = torch.arange(3, 3 + n)
        text = torch.arange(3 + n, length)
        signals = {
            "last_row": torch.rand(length, generator=generator),
            "key_norm": torch.rand(length, generator=generator),
        }
        stages.append(Stage(0, keep, visual, text, signals, torch.randn(length, 16, generator=generator)))
    together = method.choose_all(stages)
    assert len(together) == len(stages)
    for stage_, chosen in zip(stages, together, strict=True):
        alone = method.choose(stage_)
        assert torch.equal(chosen, alone)
        assert len(chosen) >= stage_.keep and torch.equal(chosen, chosen.unique())  # sorted, distinct
