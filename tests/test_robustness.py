"""A hostile user's cases: copies, overlapping attachments, threads, fixed-shape caches, reused compressed caches.

Each case either works as the plain model would or is refused with an error that says what to do instead, and a
refusal leaves the model attached and working.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

import vtc
from tests.helpers import count_hooks
from vtc.tiny import tiny_llava, tiny_llava_inputs


@pytest.fixture(scope="module")
def model():
    return tiny_llava(image_size=112, text_layers=4)


@pytest.fixture(scope="module")
def batch(model):
    return tiny_llava_inputs(model, images_per_sample=(1,), seed=5)


@pytest.fixture(scope="module")
def other(model):
    return tiny_llava_inputs(model, images_per_sample=(1,), text_lengths=((6, 4),), seed=6)


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def greedy(model, inputs, steps: int = 3) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)[:, -steps:]


# -- copies ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["divprune", "fastv", ["dart", "pdrop"]])
def test_copying_an_attached_model_is_refused_and_the_model_keeps_working(model, batch, method):
    keep = [32, 8] if isinstance(method, list) else 8
    with vtc.compress(model, method, keep=keep) as handle:
        expected = logits(model, batch)
        with pytest.raises(RuntimeError, match=r"cannot copy or pickle a model while vtc is attached.*handle.remove"):
            copy.deepcopy(model)
        with pytest.raises(RuntimeError, match="cannot copy or pickle"):
            pickle.dumps(model)
        assert torch.equal(logits(model, batch), expected)
        assert handle.stats["visual_tokens_per_layer"][0][-1] == 8
    clone = copy.deepcopy(model)  # after remove(): a plain model, which vtc can compress on its own
    assert count_hooks(clone) == count_hooks(model)
    assert torch.equal(logits(clone, batch), logits(model, batch))
    with vtc.compress(clone, method, keep=keep):
        assert torch.equal(logits(clone, batch), expected)


# -- overlapping attachments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["outer", "inner"])
def test_attaching_to_a_model_inside_an_attached_one_is_refused(model, batch, first):
    outer, inner = model, model.model
    attached, again = (outer, inner) if first == "outer" else (inner, outer)
    expected = logits(model, batch)
    with vtc.compress(attached, "divprune", keep=8) as handle:
        compressed = logits(model, batch)
        hooks = count_hooks(model)
        where = "the LlavaForConditionalGeneration that contains it" if first == "outer" else "its submodule LlavaModel"
        with pytest.raises(RuntimeError, match=rf"already attached to {where} \(CompressionHandle\(divprune"):
            vtc.compress(again, "random", keep=4)
        assert count_hooks(model) == hooks
        assert torch.equal(logits(model, batch), compressed)
        assert handle.stats["visual_tokens_after"] == [8]
    assert torch.equal(logits(model, batch), expected)
    with vtc.compress(again, "random", keep=4) as handle:
        logits(model, batch)
    assert handle.stats["visual_tokens_after"] == [4]


def test_attaching_to_a_model_that_shares_modules_with_an_attached_one_is_refused(model, batch):
    """Two wrappers around one LlavaModel (or a copy.copy, which shares every submodule) hook the same modules."""
    twin = copy.copy(model)
    with vtc.compress(model, "divprune", keep=8) as handle:
        with pytest.raises(RuntimeError, match=r"already attached to a LlavaForConditionalGeneration that shares"):
            vtc.compress(twin, "random", keep=4)
        logits(twin, batch)
        assert handle.stats["visual_tokens_after"] == [8]


# -- threads --------------------------------------------------------------------------------------------------------


def in_thread(fn):
    """Run fn() in another thread and wait: (its result, the exception it raised)."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as error:  # noqa: BLE001 - handed back to the test
            out["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out.get("result"), out.get("error")


THREAD_BUSY = "another thread is inside this LlavaForConditionalGeneration"


@pytest.mark.parametrize("method", ["divprune", "fastervlm", "fastv"])
def test_a_call_from_a_second_thread_while_one_runs_is_refused(model, batch, other, method):
    """While the first thread is inside the model, a second one's forward, or its generate() (which on transformers
    5 encodes the image, writing vtc's vision-side state, before its forward), is refused before it does anything."""
    with vtc.compress(model, method, keep=8) as handle:
        expected, expected_tokens = logits(model, batch), greedy(model, batch)
        seen: list = []

        def meanwhile(module, args):  # inside the first thread's prefill, its image already encoded
            if not seen:
                seen.append(in_thread(lambda: logits(model, other)))
                seen.append(in_thread(lambda: greedy(model, other)))

        hook = model.model.language_model.register_forward_pre_hook(meanwhile)
        try:
            out = logits(model, batch)
            seen.clear()
            tokens = greedy(model, batch)
        finally:
            hook.remove()
        for result, error in seen:
            assert result is None and isinstance(error, RuntimeError) and THREAD_BUSY in str(error), error
            assert "one after another" in str(error)
        assert torch.equal(out, expected) and torch.equal(tokens, expected_tokens)  # the first calls undisturbed
        assert handle.stats["visual_tokens_after"] == [8]
        assert in_thread(lambda: torch.equal(logits(model, batch), expected)) == (True, None)  # later: fine


def test_an_interrupted_call_leaves_nothing_behind(model, batch):
    """Ctrl-C (KeyboardInterrupt) in the middle of a forward: later calls from any thread run."""

    def interrupt(module, args):
        raise KeyboardInterrupt

    with vtc.compress(model, "fastervlm", keep=8):
        expected = logits(model, batch)
        hook = model.model.language_model.layers[1].register_forward_pre_hook(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                logits(model, batch)
        finally:
            hook.remove()
        assert in_thread(lambda: torch.equal(logits(model, batch), expected)) == (True, None)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_a_generation_interleaved_with_another_prefill_is_refused(model, batch, other, method):
    """Thread A prefills, thread B runs a whole prefill, A's next decode step would use B's state: refused. A
    generation handed from one thread to another with nothing in between decodes as in one thread."""
    with vtc.compress(model, method, keep=8), torch.no_grad():
        first = model(**batch, use_cache=True)
        token = first.logits[:, -1:].argmax(-1)
        step = {"input_ids": token, "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + 1, dtype=torch.long)}
        expected = model(**step, past_key_values=first.past_key_values).logits

        again = model(**batch, use_cache=True)
        handed = in_thread(lambda: model(**step, past_key_values=again.past_key_values).logits)
        assert handed[1] is None and torch.equal(handed[0], expected)

        again = model(**batch, use_cache=True)
        assert in_thread(lambda: model(**other, use_cache=True))[1] is None
        with pytest.raises(RuntimeError, match="another prefill has run on this model since"):
            model(**step, past_key_values=again.past_key_values)


def test_a_plain_cache_decodes_after_another_prefill(model, batch, other):
    """A cache vtc did not shorten (a text-only generation) needs no state: other prefills do not matter."""
    text = {"input_ids": batch["input_ids"][:, -6:], "attention_mask": batch["attention_mask"][:, -6:]}
    with torch.no_grad():
        plain = model(**text, use_cache=True)
        step = {"input_ids": plain.logits[:, -1:].argmax(-1), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
        expected = model(**step, past_key_values=plain.past_key_values).logits
    with vtc.compress(model, "fastv", keep=8), torch.no_grad():
        text_cache = model(**text, use_cache=True).past_key_values
        model(**other, use_cache=True)
        assert torch.equal(model(**step, past_key_values=text_cache).logits, expected)


# -- caches ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["divprune", "dart", "fastv", ["divprune", "fastv"]])
def test_a_static_cache_is_refused_by_every_method_before_the_language_model_runs(batch, method):
    # A model of its own: transformers 4.57's generate() keeps the refused StaticCache on the model, uninitialized,
    # and its next static-cache call trips on it (AttributeError in transformers' _get_cache, vtc attached or not).
    model = tiny_llava(image_size=112, text_layers=4)
    keep = [32, 8] if isinstance(method, list) else 8
    calls = []
    spy = model.model.language_model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    with vtc.compress(model, method, keep=keep):
        expected = greedy(model, batch)
        calls.clear()
        try:
            with pytest.raises(ValueError, match=r"shortens the KV cache.*StaticCache.*use the default DynamicCache"):
                model.generate(**batch, max_new_tokens=2, cache_implementation="static")
        finally:
            spy.remove()
        assert not calls
        assert torch.equal(greedy(model, batch), expected)


def test_a_static_cache_without_images_needs_nothing_from_vtc(batch):
    model = tiny_llava(image_size=112, text_layers=4)
    text = {"input_ids": batch["input_ids"][:, -6:], "attention_mask": batch["attention_mask"][:, -6:]}
    expected = model.generate(**text, max_new_tokens=3, do_sample=False, cache_implementation="static")
    with vtc.compress(model, "fastv", keep=8):
        out = model.generate(**text, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(out, expected)


def test_a_new_turn_reusing_a_compressed_cache_names_the_real_cause(model, batch):
    with vtc.compress(model, "divprune", keep=8):
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        history = torch.cat([out.sequences, torch.tensor([[5, 6, 7]])], dim=1)
        with pytest.raises(ValueError, match=r"a new turn cannot reuse a compressed cache.*without past_key_values"):
            model.generate(
                input_ids=history, attention_mask=torch.ones_like(history), past_key_values=out.past_key_values
            )
        again = model.generate(**batch, max_new_tokens=2, do_sample=False)  # the model still works
    assert torch.equal(again, out.sequences)
