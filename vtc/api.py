"""The public entry points: compress(model, ...) and select(method, ...)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

import vtc.adapters  # noqa: F401  (registers the families)
import vtc.methods  # noqa: F401  (registers the methods)
from vtc.adapters.base import Adapter
from vtc.methods.base import Budget, Method, Plan, check_signals, num_tokens
from vtc.methods.keep_all import KeepAll
from vtc.methods.layerwise import LayerwiseMethod
from vtc.registry import get_adapter_class, get_method, list_methods

# model -> description of what is attached. The value must not reference the model, or the entry would keep
# its own weak key alive.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class CompressionHandle:
    """A method attached to a model. Use as a context manager or call :meth:`remove`.

    Attributes:
        methods / budgets: the methods in use (pre-LLM and/or in-LLM) and their budgets; ``method`` /
            ``budget`` are the first of them.
        last_kept: after each prefill, one sorted 1-D LongTensor per batch sample: indices, into that
            sample's visual tokens in original order (images concatenated), of the tokens that reach the
            language model's last layer. Empty tensors for samples without images; None before the
            first forward.
        last_plan: the pre-LLM :class:`~vtc.Plan` of the last prefill when all images shared one call.
        stats: per sample, visual tokens before / after, images, visual tokens at the input of every
            language-model layer (``visual_tokens_per_layer``), an estimate of the language model's
            prefill FLOPs compressed vs uncompressed (``prefill_flops``), and the signals used.
    """

    def __init__(self, model: nn.Module, adapter: Adapter):
        self.model = model
        stages = [(adapter.method, adapter.budget), (adapter.layerwise, adapter.layer_budget)]
        stages = [(m, b) for m, b in stages if m is not None and not isinstance(m, KeepAll)]
        self.methods = tuple(m for m, _ in stages)
        self.budgets = tuple(b for _, b in stages)
        self.method, self.budget = stages[0]
        self.active = True
        self._adapter = adapter

    @property
    def last_kept(self) -> list[torch.Tensor] | None:
        last = self._adapter.last
        return None if last is None else last.kept

    @property
    def last_plan(self) -> Plan | None:
        last = self._adapter.last
        return None if last is None else last.plan

    @property
    def stats(self) -> dict[str, Any] | None:
        last = self._adapter.last
        if last is None:
            return None
        return {
            "visual_tokens_before": list(last.tokens_before),
            "visual_tokens_after": list(last.tokens_after),
            "images": list(last.images),
            **({"videos": list(last.videos)} if last.videos is not None else {}),
            "signals": list(last.signals_used),
            "signal_sources": {
                name: last.signal_sources[name] for name in last.signals_used if name in last.signal_sources
            },
            "visual_tokens_per_layer": last.visual_per_layer,
            "prefill_flops": last.flops,
        }

    def remove(self) -> None:
        """Detach every hook; the model is exactly as before. Results stay readable. Safe to call twice."""
        if not self.active:
            return
        self._adapter.detach()
        self.active = False
        _ATTACHED.pop(self.model, None)

    def __enter__(self) -> CompressionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        stages = ", ".join(f"{m.name}: {m!r}, {b}" for m, b in zip(self.methods, self.budgets, strict=True))
        return f"CompressionHandle({stages}, {state})"


def _resolve_method(method: str | Method | LayerwiseMethod, options: dict[str, Any]) -> Method | LayerwiseMethod:
    if isinstance(method, (Method, LayerwiseMethod)):
        if options:
            raise ValueError(
                f"options {sorted(options)} were given next to a {type(method).__name__} instance; "
                "set them on the instance instead"
            )
        return method
    if isinstance(method, str):
        return get_method(method, **options)
    raise TypeError(
        f"method must be a method name (see vtc.list_methods()) or a vtc.Method, got {type(method).__name__}"
    )


def _stages(
    method: Any, keep: Any, ratio: Any, options: dict[str, Any]
) -> tuple[Method, Budget, LayerwiseMethod | None, Budget | None]:
    """(pre-LLM method, its budget, in-LLM method or None, its budget) for compress()'s arguments."""
    if not isinstance(method, (list, tuple)):
        resolved = _resolve_method(method, options)
        if isinstance(resolved, LayerwiseMethod):
            return KeepAll(), Budget(ratio=1.0), resolved, Budget(keep=keep, ratio=ratio)
        return resolved, Budget(keep=keep, ratio=ratio), None, None
    if len(method) != 2:
        raise ValueError(f"a method list holds a pre-LLM method then an in-LLM method, got {len(method)} entries")
    if options:
        raise ValueError(f"options {sorted(options)} are ambiguous with a method list; pass method instances instead")
    pre, llm = (_resolve_method(m, {}) for m in method)
    if not isinstance(pre, Method) or not isinstance(llm, LayerwiseMethod):
        raise ValueError(
            f"a method list is [pre-LLM method, in-LLM method], e.g. ['divprune', 'fastv']; got "
            f"[{pre.name!r}, {llm.name!r}] (pre-LLM: {list_methods('pre')}, in-LLM: {list_methods('llm')})"
        )
    budgets = []
    for name, value in (("keep", keep), ("ratio", ratio)):
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 2):
            raise ValueError(f"with a method list, {name} must be a list of 2 (one per method), got {value!r}")
    for i in range(2):
        budgets.append(Budget(keep=None if keep is None else keep[i], ratio=None if ratio is None else ratio[i]))
    return pre, budgets[0], llm, budgets[1]


def _refuse_overlap(model: nn.Module) -> None:
    """One attachment per module: hooks of two adapters on shared modules would each see half the story (a model
    inside or around an attached one, two wrappers around one LlavaModel, a copy.copy sharing submodules)."""
    modules = {id(m) for m in model.modules()}
    for attached, description in list(_ATTACHED.items()):
        if attached is model:
            where = "this model"
        elif id(attached) in modules:
            where = f"its submodule {type(attached).__name__}"
        elif any(m is model for m in attached.modules()):
            where = f"the {type(attached).__name__} that contains it"
        elif not modules.isdisjoint(id(m) for m in attached.modules()):
            where = f"a {type(attached).__name__} that shares modules with it"
        else:
            continue
        raise RuntimeError(
            f"vtc is already attached to {where} ({description}); call that handle's remove() before attaching again"
        )


POSITIONS = ("original", "compact")  # vtc.compress(positions=...)


def compress(
    model: nn.Module,
    method: str | Method | LayerwiseMethod | list,
    *,
    keep: int | list[int] | None = None,
    ratio: float | list[float] | None = None,
    budget: str | None = None,
    video_budget: str | None = None,
    cls_model: Any = None,
    positions: str = "original",
    **method_options: Any,
) -> CompressionHandle:
    """Attach a visual-token compression method to a Hugging Face VLM.

    Args:
        model: e.g. a ``LlavaForConditionalGeneration`` (see :func:`vtc.list_models`).
        method: a name from :func:`vtc.list_methods` or a method instance; or a list
            ``[pre-LLM method, in-LLM method]`` (e.g. ``["divprune", "fastv"]``), then ``keep`` / ``ratio``
            are lists with one budget per method (``keep=[192, 64]``: 192 tokens per image reach the
            language model, 64 go on after the in-LLM method's drop layer).
        keep: visual tokens kept per image. Exactly one of ``keep`` / ``ratio``. In-LLM methods: the count
            after their (last) drop layer; for "adaptive" the floor.
        ratio: fraction of visual tokens kept per image, in (0, 1] (round(ratio * N), at least 1).
        budget: LLaVA-NeXT, LLaVA-OneVision and InternVL: how ``keep`` is shared by an image's parts (pre-LLM
            methods; in-LLM ones choose per image). LLaVA-NeXT / OneVision (base and AnyRes crops): "global"
            (default), "per_crop" or "thumbnail" (see :mod:`vtc.adapters.llava_next`,
            :mod:`vtc.adapters.llava_onevision`); InternVL (tiles and thumbnail): "global" (default) or "per_crop"
            (see :mod:`vtc.adapters.internvl`).
        video_budget: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision: what ``keep`` / ``ratio`` means for a
            video (pre-LLM methods; in-LLM ones choose per video): "per_video" (default: one selection over all its
            frames) or "per_frame" (each frame, on Qwen each temporal patch, on its own); see
            :mod:`vtc.adapters.qwen2_vl`, :mod:`vtc.adapters.llava_onevision`.
        cls_model: Qwen2-VL / Qwen2.5-VL only (not Qwen3-VL / Qwen3.5): an auxiliary open_clip CLIP (a model name
            such as "ViT-B-16", "name:pretrained", a (name, pretrained) tuple or a model) whose [CLS] attention is
            resampled onto the visual-token grid, for methods that need ``cls_attention``.
        positions: the position ids of the tokens the language model receives after a pre-LLM method.
            "original" (default): the kept tokens keep their positions, so dropping a token equals masking it out (the
            language model sees exactly the uncompressed prompt's positions). "compact": each token's position less
            the tokens removed before it, as if they had never been in the prompt, which is what the reference code of
            FasterVLM, DivPrune and VisionZip does (their published accuracies were measured that way), and what vLLM
            does (vtc's vLLM plugin supports only "compact" on LLaVA). 1-D RoPE families only (LLaVA, LLaVA-NeXT,
            LLaVA-OneVision, InternVL); refused with in-LLM methods. The M-RoPE families (Qwen) have no gap to close.
        **method_options: the method's fields, e.g. ``merge=True`` for "dart".

    Returns:
        A :class:`CompressionHandle`; ``handle.remove()`` (or leaving a ``with`` block) restores the model.

    Every check runs before any hook is attached: on error the model is untouched.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    pre, pre_budget, llm, llm_budget = _stages(method, keep, ratio, method_options)
    adapter_class = get_adapter_class(model)
    _refuse_overlap(model)
    given = (("budget", budget), ("video_budget", video_budget), ("cls_model", cls_model))
    options = {name: value for name, value in given if value is not None}
    options["positions"] = positions
    adapter = adapter_class(model, pre, pre_budget, options, layerwise=llm, layer_budget=llm_budget)
    adapter.check()
    adapter.attach()
    handle = CompressionHandle(model, adapter)
    _ATTACHED[model] = repr(handle)
    return handle


def select(
    method: str | Method,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    features: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    **signals: Any,
) -> torch.Tensor:
    """Choose visual tokens from plain tensors, without a model.

    Args:
        method: a name from :func:`vtc.list_methods` or a :class:`~vtc.Method` instance (for options).
        keep / ratio: tokens kept per image (exactly one).
        features: [B, N, D] visual tokens as the language model would receive them.
        cls_attention: [B, N] vision [CLS] attention over the visual tokens.
        **signals: further signals by name (see ``vtc.SIGNALS``), e.g. ``cls_attention_layers``,
            ``protected``, ``grid``.

    Returns:
        [B, K] LongTensor of kept indices into N, sorted. The same code path as :func:`compress`.
    """
    resolved = _resolve_method(method, {})
    if isinstance(resolved, LayerwiseMethod):
        raise ValueError(
            f"{resolved.name!r} drops tokens inside the language model and needs a model: use vtc.compress; "
            f"vtc.select works with the pre-LLM methods {list_methods('pre')}"
        )
    budget = Budget(keep=keep, ratio=ratio)
    signals = {"features": features, "cls_attention": cls_attention, **signals}
    signals = {name: value for name, value in signals.items() if value is not None}
    signals = check_signals(resolved, signals)
    return resolved.select(signals, budget.tokens(num_tokens(signals)))
