"""Non-finite signals, for every registered pre-LLM method, through vtc.select and Method.plan (the adapters' path).

A signal a method ranks by (its ``requires``) must be finite: NaN / inf there raises a ValueError that
names the signal, its bad rows and the fix. A signal the method does not read is carried as it is and
does not change the choice. Large finite values (bf16 features can reach 3e38) are accepted and every
method still keeps exactly ``keep`` sorted, unique tokens.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from tests.helpers import count_hooks, with_grid

B, N, D, V = 3, 50, 16, 4
KEEP = 7
BAD = {"nan": float("nan"), "posinf": float("inf"), "neginf": float("-inf")}
FLOAT_SIGNALS = ("features", "cls_attention", "cls_attention_layers")
METHODS = vtc.list_methods("pre")


def make_signals(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(B, N, D, generator=g),
        "cls_attention": torch.randn(B, N, generator=g).softmax(-1),
        "cls_attention_layers": torch.randn(B, V, N, generator=g).softmax(-1),
    }


def usable(method: vtc.Method, signals: dict[str, torch.Tensor], keep: int = KEEP) -> dict:
    """``signals`` plus a video grid (frames of at most ``keep`` tokens) if the method is temporal."""
    return with_grid(signals, method, keep=keep)


def spoil(signals: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    """A copy with ``value`` in rows 0 and 2 of signal ``name`` (one entry in row 0, a whole token in row 2)."""
    out = {k: v.clone() for k, v in signals.items()}
    bad = out[name]
    bad[0].view(-1)[17] = value
    if name == "cls_attention_layers":
        bad[2, :, 4] = value
    else:
        bad[2, 4] = value
    return out


def check_indices(kept: torch.Tensor, b: int, n: int, keep: int) -> None:
    assert kept.dtype == torch.long and tuple(kept.shape) == (b, keep)
    assert int(kept.min()) >= 0 and int(kept.max()) < n
    assert (kept.diff(dim=1) > 0).all(), f"kept indices must be sorted and unique, got {kept.tolist()}"


CASES = [
    pytest.param(method, signal, kind, id=f"{method}-{signal}-{kind}")
    for method in METHODS
    for signal in FLOAT_SIGNALS
    for kind in BAD
]


@pytest.mark.parametrize("path", ["select", "plan"])
@pytest.mark.parametrize(("name", "signal", "kind"), CASES)
def test_nonfinite_signal(name, signal, kind, path):
    """Required signal: a ValueError naming it, the method and rows [0, 2]. Other signal: the clean choice."""
    method = vtc.get_method(name)
    signals = usable(method, spoil(make_signals(), signal, BAD[kind]))

    def run(s):
        return vtc.select(method, keep=KEEP, **s) if path == "select" else method.plan(s, KEEP).kept

    if signal in method.requires:
        with pytest.raises(ValueError, match=rf"signal '{signal}'.*non-finite.*row\(s\) \[0, 2\] of {B}.*'{name}'"):
            run(signals)
    else:
        kept = run(signals)
        check_indices(kept, B, N, KEEP)
        assert torch.equal(kept, run(usable(method, make_signals()))), f"{name} does not read {signal}: same choice"


@pytest.mark.parametrize("name", METHODS)
def test_bug_report_inf_feature(name):
    """The report: one inf feature made divprune return [2, 2] for keep=3 (a token picked twice)."""
    x = torch.randn(2, 10, 4)
    x[0, 5] = float("inf")
    method = vtc.get_method(name)
    signals = {"features": x, "cls_attention": torch.rand(2, 10), "cls_attention_layers": torch.rand(2, V, 10)}
    signals = usable(method, signals, keep=3)
    if "features" in method.requires:
        with pytest.raises(ValueError, match=r"signal 'features' of shape \(2, 10, 4\) holds non-finite values "
                           r"\(4 \+inf\) in batch row\(s\) \[0\] of 2"):  # fmt: skip
            vtc.select(name, keep=3, **signals)
    else:
        check_indices(vtc.select(name, keep=3, **signals), 2, 10, 3)


def test_error_says_what_to_do():
    signals = spoil(make_signals(), "cls_attention", float("nan"))
    with pytest.raises(ValueError, match=r"\(2 NaN\).*torch\.nan_to_num"):
        vtc.select("fastervlm", keep=KEEP, **signals)


def test_float64_overflow_is_explained():
    """fp64 values beyond fp32's range become inf in vtc's fp32 signals: the error says so."""
    layers = make_signals()["cls_attention_layers"].double()
    layers[1, 2, 3] = 1e300
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of 3 \(torch.float64 values beyond the fp32 range"):
        vtc.select("vtc_cls", keep=KEEP, cls_attention_layers=layers)


def test_keep_all_is_checked_too():
    """keep == N selects nothing but gets the same answer as any budget: the input is refused."""
    signals = spoil(make_signals(), "features", float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        vtc.select("divprune", keep=N, **signals)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("name", METHODS)
def test_large_finite_signals_are_accepted(name, dtype):
    """Large but finite values pass the check; exact counts, with and without protected tokens."""
    big = torch.finfo(dtype).max / 4  # bf16 / fp32: ~8e37, every squared norm overflows fp32; fp16: 16376
    signals = make_signals()
    signals["features"][0, 3] = big
    signals["features"][2] = signals["features"][2].sign() * big  # a whole row of huge tokens
    signals["cls_attention"][1, :10] = big
    signals["cls_attention_layers"][1, :, :10] = big
    signals = usable(vtc.get_method(name), {k: v.to(dtype) for k, v in signals.items()})
    check_indices(vtc.select(name, keep=KEEP, **signals), B, N, KEEP)
    protected = torch.zeros(B, N, dtype=torch.bool)
    protected[0, [3, 9]] = True
    protected[2, 0] = True
    kept = vtc.select(name, keep=KEEP, protected=protected, **signals)
    check_indices(kept, B, N, KEEP)
    assert int(protected.gather(1, kept).sum()) == 3


def test_overflowing_score_with_protected_keeps_exact_count():
    """Finite attention whose layer sum overflows to -inf (vtc_cls) must not tie with the protected tokens'
    -inf mask in fill_top, or a row could take a protected token twice and come out short."""
    n = 577
    g = torch.Generator().manual_seed(0)
    layers = torch.rand(B, V, n, generator=g)
    layers[:, :, 100:] = torch.finfo(torch.float32).min  # sums to -inf over the V layers
    protected = torch.rand(B, n, generator=g) < 0.1  # ~58 per row, spread over finite and -inf scores
    keep = int(protected.sum(dim=1).max()) + 150
    method = vtc.get_method("vtc_cls", start_layer=0)
    kept = vtc.select(method, keep=keep, protected=protected, cls_attention_layers=layers)
    check_indices(kept, B, n, keep)
    assert torch.equal(protected.gather(1, kept).sum(dim=1), protected.sum(dim=1))


# --- the adapters' path: a forward of a tiny LLaVA whose second image is NaN --------------------------------


@pytest.fixture(scope="module")
def llava():
    pytest.importorskip("transformers")
    from vtc.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava(vision_layers=4)
    inputs = tiny_llava_inputs(model, images_per_sample=(1, 1), seed=1)
    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-capturing hooks at the first forward
    inputs["pixel_values"][1] = float("nan")
    return model, inputs


@pytest.mark.parametrize("name", vtc.list_methods("pre", images=True))
def test_adapter_forward(llava, name):
    """Method.plan runs inside the forward: the same error (the NaN image is row 1 of its batched call),
    the hooks still come off; a method that reads no signal keeps its exact count."""
    model, inputs = llava
    method = vtc.get_method(name)
    hooks = count_hooks(model)
    with vtc.compress(model, name, keep=5) as handle, torch.no_grad():
        if any(signal in method.requires for signal in FLOAT_SIGNALS):
            with pytest.raises(ValueError, match=rf"signal '{method.requires[0]}'.*non-finite.*row\(s\) \[1\] of 2"):
                model(**inputs)
        else:
            model(**inputs)
            assert handle.stats["visual_tokens_after"] == [5, 5]
    assert count_hooks(model) == hooks


@pytest.mark.parametrize("via", ["forward", "generate"])
def test_llava_next_names_the_nan_whichever_way_it_locates_the_crops(via):
    """generate() on transformers 5 drops image_sizes, so LLaVA-NeXT's adapter finds the AnyRes crops by matching
    the packed tokens to the projector's output, bit for bit: a copied NaN matches itself, and the error is the
    NaN's, not a failed match."""
    from vtc.tiny import tiny_llava_next, tiny_llava_next_inputs

    model = tiny_llava_next(text_layers=4)
    inputs = tiny_llava_next_inputs(model, image_sizes=(((56, 112),),), seed=1)

    def one_nan(module, args, output):
        output = output.clone()
        output[0, 0, 0] = float("nan")
        return output

    hook = model.model.multi_modal_projector.register_forward_hook(one_nan)
    try:
        nan_error = pytest.raises(ValueError, match=r"signal 'features'.*non-finite values \(1 NaN\)")
        with vtc.compress(model, "divprune", keep=12), torch.no_grad(), nan_error:
            model(**inputs) if via == "forward" else model.generate(**inputs, max_new_tokens=2)
    finally:
        hook.remove()
