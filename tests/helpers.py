"""Shared test helpers: tiny models, greedy references, refused command lines."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def case_id(case: tuple[str, dict]) -> str:
    """A test id for a (method name, options) case, e.g. 'dart-merge'."""
    name, options = case
    return name + "".join(f"-{k}" for k in options)


def count_hooks(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks registered anywhere in the model."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def greedy_no_cache(model, inputs: dict, steps: int, positions: bool = True) -> torch.Tensor:
    """Greedy decoding that re-runs the whole prompt every step (no KV cache): [B, steps] new tokens.

    ``positions=True``: position ids follow the attention mask, as generate() computes them (LLaVA).
    ``positions=False``: no position_ids, the model derives them itself (Qwen's M-RoPE from input_ids,
    image_grid_thw and the mask). transformers 5.x's mm_token_type_ids grow with 0 for the new text tokens.
    """
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs.get("mm_token_type_ids")
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    new = []
    for _ in range(steps):
        if types is not None:
            extra["mm_token_type_ids"] = types
        if positions:
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        token = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1].argmax(-1, True)
        new.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        types = None if types is None else torch.cat([types, torch.zeros_like(token)], dim=1)
    return torch.cat(new, dim=1)


@torch.no_grad()
def greedy_generate(model, inputs: dict, steps: int) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, -steps:]


class Replay:
    """Makes an in-LLM method repeat, on every later forward, the choices it made on the first one.

    Last-token methods (FastV, PDrop) choose from the prompt's last token, so a no-cache reference that
    re-runs prompt + generated tokens would choose again from another token. Replaying the prefill's
    choices gives the no-cache run exactly what generate() keeps in its cache.
    """

    def __init__(self, method):
        self.method = method
        self.calls: list[list[torch.Tensor]] = []  # per drop: the choice for each image
        self.replaying = False
        self._next = 0
        self._choose_all = type(method).choose_all
        method.choose_all = self._call  # what the dropper calls, once per drop layer

    def _call(self, stages):
        if not self.replaying:
            chosen = self._choose_all(self.method, stages)
            self.calls.append(chosen)
            return chosen
        chosen = self.calls[self._next % len(self.calls)]
        self._next += 1
        return chosen

    def replay(self) -> None:
        self.replaying, self._next = True, 0


def refused(main: Callable[[list[str]], int], argv: list[str], capsys) -> str:
    """The one-line error of a command line that ``main`` refuses (argparse's convention: exit code 2, whether
    returned or raised as SystemExit, and no traceback)."""
    try:
        code = main(argv)
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def video_grid(n: int, keep: int | None = None) -> tuple[int, int, int]:
    """A (T, H, W) grid of ``n`` tokens for a method that needs a video: the largest frame H * W that divides n,
    leaves T >= 2 frames (when n >= 2) and fits in ``keep`` (temporal methods may keep whole frames), with H the
    largest divisor of the frame <= its square root."""
    limit = n if keep is None else keep
    frames = [p for p in range(1, n + 1) if n % p == 0 and p <= limit and (n // p >= 2 or n == 1)]
    per_frame = max(frames)
    height = max(h for h in range(1, math.isqrt(per_frame) + 1) if per_frame % h == 0)
    return n // per_frame, height, per_frame // height


def with_grid(signals: dict, method, video: bool = False, keep: int | None = None) -> dict:
    """``signals`` plus a video grid when the method is temporal (it refuses anything else) or ``video`` is asked."""
    if not (video or method.temporal):
        return signals
    n = next(v.shape[1] if k == "features" else v.shape[-1] for k, v in signals.items() if k != "grid")
    return {**signals, "grid": video_grid(n, keep)}


def assert_each_sample_alone_equals_its_row(model, batch: dict, handle, alone: list[dict], steps: int) -> None:
    """The adapter bar's "batch == alone": with ``handle`` attached, each sample of ``batch`` run alone (``alone[b]``,
    unpadded, with its own images / videos) generates what its row of the batch generates, keeps the same tokens, and
    ends on the same logits."""
    batched = greedy_generate(model, batch, steps)
    batched_kept = handle.last_kept
    with torch.no_grad():
        batched_last = model(**batch).logits[:, -1]
    for b, single in enumerate(alone):
        assert torch.equal(greedy_generate(model, single, steps), batched[b : b + 1])
        assert torch.equal(handle.last_kept[0], batched_kept[b])
        with torch.no_grad():
            last = model(**single).logits[:, -1]
        torch.testing.assert_close(last, batched_last[b : b + 1], rtol=1e-4, atol=1e-4)


def assert_remove_restores_the_model(model, batch: dict, attach: Callable[[], object]) -> torch.Tensor:
    """The adapter bar's "remove() restores the model bit for bit": ``attach()`` (a vtc.compress call), a forward on
    ``batch``, ``remove()``; the hooks, the logits and every weight are then as before. Returns the compressed
    logits."""
    with torch.no_grad():
        before = model(**batch).logits
    hooks = count_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = attach()
    with torch.no_grad():
        compressed = model(**batch).logits
    handle.remove()
    assert count_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return compressed
