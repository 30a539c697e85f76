"""Shared test helpers: tiny models, greedy references, refused command lines."""

from __future__ import annotations

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
