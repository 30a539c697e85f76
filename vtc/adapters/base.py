"""What every model adapter shares: hook bookkeeping and dropping tokens from the language model's input.

An adapter knows where a model family places its visual tokens and how to obtain signals for the
methods. The dropping itself is the same for every family: a forward pre-hook on the language
model (the decoder stack) receives ``inputs_embeds``, ``attention_mask``, ``position_ids`` and the
KV cache (``past_key_values``; ``cache`` from transformers 5.24) as keyword arguments, removes the dropped visual
tokens, keeps the ORIGINAL position ids of the survivors, and during decoding remaps the full-length attention mask that
generate() keeps passing onto the shortened KV cache.
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vtc.llm.layers import LayerDropper
from vtc.llm.prefill import Dropped, declared_arguments, drop, kv_cache, output_cache, remap_decode, take
from vtc.methods.base import Budget, Method, Plan
from vtc.methods.layerwise import LayerwiseMethod, same_shape, total_flops
from vtc.registry import ADAPTERS, METHODS, adapter_options

# The values of video_budget= (families that compress videos): what keep / ratio means for a video.
VIDEO_BUDGETS = {
    "per_video": "keep / ratio per video, one selection over all its frames",
    "per_frame": "keep / ratio per frame (temporal patch), each planned on its own",
}


@dataclass
class Compression:
    """One prefill's outcome, per batch sample (what ``handle.last_kept`` / ``handle.stats`` show)."""

    kept: list[torch.Tensor]  # per sample: sorted indices into that sample's visual tokens
    tokens_before: list[int]
    tokens_after: list[int]
    images: list[int]
    plan: Plan | None  # over all units of the batch in sequence order, when they share one shape
    signals_used: tuple[str, ...]
    signal_sources: dict[str, str] = field(default_factory=dict)
    videos: list[int] | None = None  # per sample, where the family compresses videos (their tokens count as visual)
    visual_per_layer: list[list[int]] | None = None  # per sample: visual tokens at the input of each LLM layer
    flops: dict[str, float] | None = None  # estimated LLM prefill FLOPs, compressed vs uncompressed


@dataclass
class Unit:
    """A set of visual tokens that one method call plans over: an image, one AnyRes crop of it, a video or one of its
    frames (``grid`` (H, W), or a video's (T, H, W)).

    ``signals`` holds the vision-side signals of these tokens without the batch dimension
    (``cls_attention`` [n], ``cls_attention_layers`` [V, n], ...); features come from the prefill.
    """

    sample: int  # batch row
    positions: torch.Tensor  # [n] sequence positions of the tokens in that row
    keep: int  # tokens to keep, 0..n
    grid: tuple[int, ...] | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Image:
    """One image (or video) of a prefill: its batch row, its tokens' sequence positions, and what the vision side
    recorded for it (family-specific: its token grid, vision-side signals, ...)."""

    sample: int
    positions: torch.Tensor  # [n]
    vision: dict[str, Any] = field(default_factory=dict)
    video: bool = False


@dataclass
class _Prefill:
    """One prefill's state, from the language model's pre-hook to its post-hook, then dropped."""

    tokens_before: list[int]  # per row, tokens of the prompt
    tokens_at_input: torch.Tensor | None = None  # per row, tokens that reach the language model
    image_of: torch.Tensor | None = None  # [B, L] image id of each visual position of the prompt, else -1
    visual_index: torch.Tensor | None = None  # [B, L] index among the row's visual tokens, else -1
    vision_score: torch.Tensor | None = None  # [B, L] [CLS] attention of visual positions (in-LLM key sets)


class _Hook:
    """A hook as vtc registers it. A copy of the model (copy.deepcopy, pickle) would carry it with no handle able
    to remove it, still pointing at this adapter's state: refused, with what to do instead."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> None:
        raise _copy_refused()

    def __reduce_ex__(self, protocol: int) -> None:
        raise _copy_refused()


def _copy_refused() -> RuntimeError:
    return RuntimeError(
        "cannot copy or pickle a model while vtc is attached: the copy would carry vtc's hooks, which no handle "
        "could remove. Copy it before vtc.compress (or after handle.remove()), then attach vtc to each copy"
    )


class Adapter(ABC):
    """The pipeline every model family shares; a family's subclass declares what differs.

    A prefill goes: the model's pre-hook records where the image placeholders are (:meth:`_read_inputs` lets the
    family refuse or note inputs); the family's vision hooks (:meth:`_vision_hooks`) capture vision-side signals;
    the language model's pre-hook finds the images (:meth:`_locate_images`), splits them into units with budgets
    (:meth:`_units`), runs the method on each unit, lets the family adjust the kept set (:meth:`_complete_keep`),
    drops the rest, and keeps decoding consistent. In-LLM methods run in the decoder layers (LayerDropper).
    """

    model_types: ClassVar[dict[str, str]] = {}  # config.model_type -> the family's name, e.g. {"llava": "LLaVA-1.5"}
    # How visual tokens tile an image (vtc.geometry): "grid" (one row-major patch grid per image), "anyres" (a base
    # image + high-resolution crops, packed with newline tokens), "merged_grid" (groups of patches per token).
    layout: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # adapter options accepted by vtc.compress (e.g. "budget")
    # Submodules of the inner model (model.model) the family hooks; the first is the vision tower.
    modules: ClassVar[tuple[str, ...]]
    # Keyword arguments of the language model, besides inputs_embeds / attention_mask / position_ids /
    # cache_position, with a [B, L, ...] token axis that dropping must shorten too.
    token_aligned: ClassVar[tuple[str, ...]] = ()
    # Keyword arguments of the language model whose rows are the prompt's visual tokens in sequence order (batch
    # first), each a tensor or a list of tensors (Qwen3-VL's DeepStack features): dropping keeps the survivors' rows.
    visual_aligned: ClassVar[tuple[str, ...]] = ()
    # Why the family cannot renumber the kept tokens' positions (vtc.compress(positions="compact")); None: it can.
    compact_refused: ClassVar[str | None] = None
    # Whether the family compresses video inputs (their placeholders, config.video_token_id, count as visual tokens);
    # such a family lists "video_budget" in its options.
    compresses_video: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        budget: Budget,
        options: dict[str, Any] | None = None,
        layerwise: LayerwiseMethod | None = None,
        layer_budget: Budget | None = None,
    ):
        options = dict(options or {})
        self.positions = options.pop("positions", "original")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"option(s) {unknown} do not apply to {type(model).__name__}; "
                + "; ".join(f"{name}= applies to model_types {types}" for name, types in adapter_options().items())
            )
        self.video_budget = options.get("video_budget") or "per_video"
        if self.video_budget not in VIDEO_BUDGETS:
            described = "; ".join(f"{name!r}: {what}" for name, what in VIDEO_BUDGETS.items())
            raise ValueError(
                f"video_budget must be one of {list(VIDEO_BUDGETS)} ({described}), got {self.video_budget!r}"
            )
        base = getattr(model, "model", model)
        for name in dict.fromkeys((*self.modules, "language_model")):  # every family hooks the language model
            if not isinstance(getattr(base, name, None), nn.Module):
                family = " / ".join(self.model_types.values())
                raise ValueError(
                    f"{type(model).__name__} has no {name} module where a transformers {family} model has one; "
                    "vtc supports transformers >= 4.57"
                )
        self.model = model
        self.base = base
        config = model.config
        token = getattr(config, "image_token_id", None)
        self.image_token_id = token if token is not None else config.image_token_index
        self.video_token_id = getattr(config, "video_token_id", None) if self.compresses_video else None
        self._signature = inspect.signature(base.forward)
        self._language_arguments = declared_arguments(base.language_model)  # what dropping must not leave long
        self.sliding_window = sliding_window(base.language_model.config)
        self.method = method
        self.budget = budget
        self.layerwise = layerwise
        self.layer_budget = layer_budget
        self.dropper: LayerDropper | None = None
        self.provides: tuple[str, ...] = ()
        self.tokens_per_image: int | None = None
        self.vision_layers_used: int | None = None  # vision layers up to the feature layer, if known
        self.signal_sources: dict[str, str] = {}  # signal name -> where it comes from, for handle.stats
        self.last: Compression | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._dropped: Dropped | None = None
        self._visual: torch.Tensor | None = None  # [B, L] image (and video) placeholders of the forward in progress
        self._video_marks: torch.Tensor | None = None  # [B, L] its video placeholders, where the family has video
        self._prefill: _Prefill | None = None  # the prefill in progress
        # What the family's vision hooks recorded in the call in progress (per layer rows, first tokens, ...):
        # emptied when a vision pass starts (_vision_starts) and once a prefill has planned, so nothing of one call
        # reaches another.
        self.captured: dict[str, Any] = {}
        # KV caches this adapter has shortened: decoding one of them needs the state of its own prefill.
        self._shortened: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread whose call the per-call state belongs to (see _claim)

    # -- attach / detach --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise if the method cannot run on this model; called before any hook is attached."""
        if self.positions == "compact":
            if self.compact_refused is not None:
                raise ValueError(
                    f"positions='compact' is not supported on {type(self.model).__name__}: "
                    f"{self.compact_refused}; use positions='original' (the default)"
                )
            if self.layerwise is not None:
                raise ValueError(
                    f"positions='compact' renumbers the tokens the language model receives; {self.layerwise.name!r} "
                    "drops tokens inside it, after layers that saw their original positions. Use positions='original' "
                    "(the default) with in-LLM methods"
                )
        if self.method.temporal and not self.compresses_video:
            raise ValueError(
                f"method {self.method.name!r} compares each frame of a video with the one before, and vtc compresses "
                f"no videos on {type(self.model).__name__}; families with video: "
                f"{sorted(t for t, cls in ADAPTERS.items() if cls.compresses_video)}"
            )
        if self.video_budget == "per_frame" and self.method.name == "none":
            raise ValueError(
                f"video_budget='per_frame' says how a pre-LLM method's keep / ratio applies to a video; in-LLM method "
                f"{self.method_names!r} keeps its budget per video. Drop video_budget=, or add a pre-LLM method "
                "(vtc.compress(model, ['divprune', 'fastv'], keep=[pre, in_llm], video_budget='per_frame'))"
            )
        if self.method.temporal and self.video_budget == "per_frame":
            raise ValueError(
                f"method {self.method.name!r} compares each frame of a video with the one before, so it plans over a "
                "whole video: video_budget='per_frame' (each frame planned alone) cannot use it; use "
                "video_budget='per_video' (the default)"
            )
        missing = [s for s in self.requires if s not in self.provides]
        if missing:
            usable = sorted(name for name, cls in METHODS.items() if set(cls.requires) <= set(self.provides))
            raise ValueError(
                f"method {self.method_names!r} needs signal(s) {missing}, which {type(self).__name__} cannot "
                f"provide for this model (it provides {list(self.provides)}); methods that work here: {usable}"
            )
        if self.tokens_per_image is not None:
            reach_llm = self.budget.tokens(self.tokens_per_image)  # raises if keep > N
            if self.layer_budget is not None:
                self.layer_budget.tokens(reach_llm)  # the same for the in-LLM budget, of what the LLM receives
        self.method.check_geometry(self.tokens_per_image, self.vision_layers_used)
        if self.layerwise is not None:
            self.dropper = LayerDropper(self.layerwise, self.layer_budget, self.base.language_model)

    def attach(self) -> None:
        try:
            self._hooks.append(self.model.register_forward_pre_hook(_Hook(self._claim), prepend=True))
            self._register_hooks()
        except BaseException:
            self.detach()
            raise

    def _claim(self, module: nn.Module, *_: Any) -> None:
        """A call starts that writes per-call state (a forward of the model, or of its vision tower, which
        transformers 5's generate() runs before the forward). The state lives on this adapter, so while another
        thread is inside the model (between its image encoding and its prefill, or in a forward) the call is
        refused before it does anything, rather than mixed with the other one's. Whether the last owner is still
        inside is read off its stack, only when threads change: an interrupted call (KeyboardInterrupt) or a
        finished one leaves nothing behind."""
        me = threading.get_ident()
        if self._owner == me:
            return
        with self._lock:
            owner = self._owner
            if owner is not None and owner != me and self._inside_model(owner):
                raise RuntimeError(
                    f"vtc: another thread is inside this {type(self.model).__name__} (a forward or generate()), and "
                    "vtc keeps one call's state per attached model. Run generate() calls one after another (a lock "
                    "around them), or give each thread its own model copy with its own vtc.compress"
                )
            self._owner = me

    def _inside_model(self, thread: int) -> bool:
        """Whether that thread is running a method of the attached model (generate, forward, its encoders)."""
        frame = sys._current_frames().get(thread)
        models = (self.model, getattr(self, "base", self.model))
        while frame is not None:
            owner = frame.f_locals.get("self")
            if any(owner is model for model in models):
                return True
            frame = frame.f_back
        return False

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._dropped = None

    @property
    def method_names(self) -> str:
        """The attached methods' names, e.g. 'divprune + fastv' (the pre-LLM identity is not named)."""
        return " + ".join(m.name for m in (self.method, self.layerwise) if m is not None and m.name != "none")

    @property
    def requires(self) -> tuple[str, ...]:
        """Signals the attached method(s) need from the model."""
        extra = self.layerwise.requires if self.layerwise is not None else ()
        return tuple(dict.fromkeys(tuple(self.method.requires) + tuple(extra)))

    def _language_hooks(self, language_model: nn.Module) -> None:
        """Hooks on the decoder stack (dropping before it) and, for in-LLM methods, on its layers."""
        self._hook(language_model, self._language_pre_hook, pre=True)
        self._hook(language_model, self._language_post_hook, pre=False)
        if self.dropper is not None:
            for module, hook, pre in self.dropper.hooks():
                self._hook(module, hook, pre=pre)

    def _hook(self, module: nn.Module, fn: Callable, *, pre: bool, with_kwargs: bool = True) -> None:
        if pre:
            self._hooks.append(module.register_forward_pre_hook(_Hook(fn), with_kwargs=with_kwargs))
        else:
            self._hooks.append(module.register_forward_hook(_Hook(fn), with_kwargs=with_kwargs))

    def _register_hooks(self) -> None:
        if self.model is not self.base:
            self._hook(self.model, self._top_pre_hook, pre=True)
        self._hook(self.base, self._model_pre_hook, pre=True)
        self._vision_hooks()
        self._language_hooks(self.base.language_model)

    # -- what a family declares -------------------------------------------------------------------

    def _vision_hooks(self) -> None:
        """Register (through :meth:`_hook`) the hooks that capture vision-side signals. Default: none."""
        return None

    def _read_inputs(self, bound: dict[str, Any]) -> None:
        """The model's forward arguments by name, before anything else: refuse or note inputs. Default: nothing."""
        return None

    @abstractmethod
    def _locate_images(self, visual: torch.Tensor, embeds: torch.Tensor) -> list[Image]:
        """The images of a prefill, in sequence order, from its placeholders ``visual`` [B, L] and embeds."""

    @abstractmethod
    def _units(self, embeds: torch.Tensor, images: list[Image]) -> list[Unit]:
        """The units (an image, or a part of it) the method plans over, with their budgets and signals."""

    def _video_units(self, video: Image, signals: dict[str, torch.Tensor]) -> list[Unit]:
        """The units of a video whose vision info gives its ``frames`` (T, H, W), its first T * H * W positions its
        tokens frame after frame: the whole video on its (T, H, W) grid, or each frame on its (H, W) grid."""
        t, h, w = video.vision["frames"]
        positions = video.positions[: t * h * w]
        if self.video_budget == "per_video":
            return [Unit(video.sample, positions, self.budget.cap(t * h * w), (t, h, w), signals)]
        units = []
        for f in range(t):
            part = slice(f * h * w, (f + 1) * h * w)
            parts = {name: value[..., part] for name, value in signals.items()}
            units.append(Unit(video.sample, positions[part], self.budget.cap(h * w), (h, w), parts))
        return units

    def _complete_keep(self, keep: torch.Tensor, images: list[Image]) -> torch.Tensor:
        """Adjust the kept set [B, L] after planning (LLaVA-NeXT keeps newline tokens with their rows)."""
        return keep

    # -- the shared pipeline ----------------------------------------------------------------------

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        self._read_inputs(bound)
        encoded = bound.get("mm_encoder_outputs") or {}
        has_images = bound.get("pixel_values") is not None or encoded.get("image") is not None
        has_videos = self.video_token_id is not None and (
            bound.get("pixel_values_videos") is not None or encoded.get("video") is not None
        )
        self._record_placeholders(bound, has_images, has_videos)

    def _plan_prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a prefill's ``inputs_embeds`` [B, L, D]: None when nothing is dropped, else (keep [B, L] bool,
        embeds with merged values written at kept positions). Sets ``self.last``."""
        visual = self._take_placeholders(embeds)
        if visual is None:
            self._no_images(embeds)
            return None
        images = self._locate_images(visual, embeds)
        keep, embeds, plan = self._plan_units(embeds, visual, self._units(embeds, images))
        keep = self._complete_keep(keep, images)
        self.last = self._compression(visual, keep, images, plan)
        if bool(keep.all()):
            return None
        return keep, embeds

    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise ValueError(
                "vtc compression is for inference: the logits cover only the kept tokens, so labels cannot be "
                "scored; call handle.remove() (or leave the `with` block) before computing a loss"
            )

    # -- the language-model hooks -----------------------------------------------------------------

    def _language_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = kv_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self._refuse_fixed_cache(cache)
            if self._visual is not None and bool(self._visual.any()):
                self._refuse_beyond_window(embeds.shape[1])
            self._dropped = None
            self._prefill = _Prefill(self._token_counts(kwargs, embeds).tolist())
            try:
                planned = self._plan_prefill(embeds)
            finally:
                self.captured = {}
            if planned is not None:
                keep, embeds = planned
                kwargs, self._dropped = drop(
                    kwargs, embeds, keep, self.token_aligned, self._language_arguments, self.positions == "compact"
                )
                kwargs = self._keep_visual_rows(kwargs, keep)
            self._prefill.tokens_at_input = self._token_counts(kwargs, embeds)
            self._begin_layerwise(kwargs, cache)
            return (args, kwargs) if planned is not None else None
        self._prefill = None
        if self._continues_prefill(embeds):
            raise ValueError(
                "vtc cannot compress images or videos in a forward that continues an existing KV cache "
                "(chunked prefill or a multi-turn cache); start generation from an empty cache"
            )
        if cache in self._shortened and not self._holds_state_of(cache):
            raise RuntimeError(
                "vtc: this KV cache was shortened by vtc in an earlier prefill, but another prefill has run on this "
                "model since (a second generation interleaved with this one, e.g. from another thread), and vtc "
                "keeps the state of one generation per attached model. Run generations one after another, or give "
                "each thread its own model copy with its own vtc.compress"
            )
        dropped = self._dropped
        if dropped is not None and dropped.cache is not None and dropped.cache() is cache:
            self._refuse_beyond_window(dropped.original_length + past - dropped.source.shape[1] + embeds.shape[1])
        elif self.dropper is not None and self.dropper.holds_state_of(cache):
            self._refuse_beyond_window(past + embeds.shape[1])  # in-LLM: layer 0 holds every token
        if self.dropper is not None:
            self.dropper.decoding(cache)
        if dropped is None or dropped.cache is None or dropped.cache() is not cache:
            return None
        return args, remap_decode(kwargs, dropped, past, embeds.shape[1])

    def _keep_visual_rows(self, kwargs: dict, keep: torch.Tensor) -> dict:
        """The :attr:`visual_aligned` arguments with the rows of the dropped visual tokens removed."""
        if not self.visual_aligned:
            return kwargs
        visual = self._prefill.visual_index >= 0  # [B, L] the prompt's visual tokens
        rank = visual.flatten().long().cumsum(0) - 1  # row of each visual token, batch first then sequence
        rows = rank[(keep & visual).flatten()]
        total = int(visual.sum())
        out = dict(kwargs)
        for name in self.visual_aligned:
            value = kwargs.get(name)
            if value is None:
                continue
            parts = list(value) if isinstance(value, (list, tuple)) else [value]
            for part in parts:
                if not torch.is_tensor(part) or part.shape[0] != total:
                    raise ValueError(
                        f"vtc expected {name!r} to hold one row per visual token of the prompt ({total}), got "
                        f"{tuple(part.shape) if torch.is_tensor(part) else type(part).__name__}"
                    )
            kept = [part[rows.to(part.device)] for part in parts]
            out[name] = kept if isinstance(value, (list, tuple)) else kept[0]
        return out

    def _refuse_temporal_on_images(self) -> None:
        """A temporal method (evs) plans over a video's frames: an input that holds images is refused."""
        if self.method.temporal:
            raise ValueError(
                f"method {self.method.name!r} compares each frame of a video with the one before, and this input holds "
                "images, which have a single frame: give it videos only, or use another method for images"
            )

    def _encoding_video(self) -> bool:
        """Whether the vision pass starting now encodes videos: the model runs it from its get_video_features
        (transformers 4.57 and 5.x, in forward() and in 5.x's generate(), which encode images first, then videos;
        Qwen3-VL's get_video_features calls get_image_features)."""
        models = (self.model, self.base)
        frame = sys._getframe(1)
        for _ in range(48):  # the hooks' frames, torch's call wrappers, get_*_features and their decorators
            if frame is None:
                return False
            if frame.f_code.co_name == "get_video_features" and any(frame.f_locals.get("self") is m for m in models):
                return True
            frame = frame.f_back
        return False

    def _vision_starts(self, module: nn.Module) -> None:
        """A family's vision pre-hook calls this first: the call is this thread's, and captures start afresh."""
        self._claim(module)
        self.captured = {}

    def _holds_state_of(self, cache: Any) -> bool:
        dropped = self._dropped
        if dropped is not None and dropped.cache is not None and dropped.cache() is cache:
            return True
        return self.dropper is not None and self.dropper.holds_state_of(cache)

    def _refuse_beyond_window(self, length: int) -> None:
        """A sliding-window layer attends to the last ``window`` slots of its cache. Once a sequence is longer than
        that, the slots of a cache vtc shortened reach further back than the uncompressed model's do, so the result
        would not equal masking the dropped tokens: refused (a prompt before any work; a decode step when it gets
        there)."""
        if self.sliding_window is None or length <= self.sliding_window:
            return
        self._visual, self.captured = None, {}  # this call's state: nothing of it may reach the next one
        raise ValueError(
            f"{type(self.model).__name__}'s language model uses sliding-window attention over {self.sliding_window} "
            f"tokens and this sequence reaches {length}: vtc shortens the KV cache, so its sliding layers would see "
            f"further back than the uncompressed model. vtc supports sequences (prompt + generated tokens) of at most "
            f"{self.sliding_window} tokens on this model; shorten the prompt or max_new_tokens, or run it uncompressed"
        )

    def _refuse_fixed_cache(self, cache: Any) -> None:
        """A prefill with images cannot shorten a cache of fixed shapes: refused before any planning."""
        if cache is None or not getattr(cache, "is_compileable", False):
            return
        if self._visual is None or not bool(self._visual.any()):
            return  # no images: nothing is dropped
        self._visual = None
        raise ValueError(
            f"{self.method_names!r} shortens the KV cache (pre-LLM methods the prompt, in-LLM methods the later "
            f"layers), which a {type(cache).__name__} (fixed shapes, cache_implementation='static', torch.compile) "
            "cannot hold; use the default DynamicCache (no cache_implementation)"
        )

    def _language_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = output_cache(output)
        if self._dropped is not None and self._dropped.cache is None and cache is not None:
            self._dropped.cache = weakref.ref(cache)
        if self.dropper is not None:
            self.dropper.bind_cache(cache)
        if cache is not None and self._prefill is not None and self._holds_state_of(cache):
            self._shortened.add(cache)
        if self._prefill is not None and self.last is not None:
            self._record_layers(self._prefill)
        self._prefill = None

    @staticmethod
    def _token_counts(kwargs: dict, embeds: torch.Tensor) -> torch.Tensor:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            return mask.sum(dim=1)
        return torch.full((embeds.shape[0],), embeds.shape[1], device=embeds.device)

    def _lm_input(self, values: torch.Tensor) -> torch.Tensor:
        """[B, L] values over the prefill's positions, at the language model's input positions."""
        return values if self._dropped is None else take(values, self._dropped.source, -1)

    def _begin_layerwise(self, kwargs: dict, cache: Any) -> None:
        if self.dropper is None:
            return
        image = self._prefill.image_of
        embeds = kwargs["inputs_embeds"]
        if image is None:
            image = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        mask = kwargs.get("attention_mask")
        valid = (
            mask.bool() if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        )
        score = self._prefill.vision_score
        self.dropper.begin(self._lm_input(image), valid, cache, None if score is None else self._lm_input(score))

    def _record_layers(self, prefill: _Prefill) -> None:
        """After a prefill: visual tokens at every LLM layer, survivors of the last layer, FLOPs estimate."""
        original, at_input, visual_index = prefill.tokens_before, prefill.tokens_at_input, prefill.visual_index
        last = self.last
        depth = len(self.base.language_model.layers)
        tokens = [at_input.tolist()] * depth
        finished = self.dropper.finished if self.dropper is not None else None
        if finished is not None and visual_index is not None:
            index = take(self._lm_input(visual_index), finished.order, -1)
            last.kept = [row[row >= 0].sort().values for row in index]
            last.tokens_after = [k.numel() for k in last.kept]
            at_lm = (self._lm_input(visual_index) >= 0).sum(dim=1).tolist()
            per_layer = [at_lm] + finished.visual_counts
            last.visual_per_layer = [list(sample) for sample in zip(*per_layer, strict=True)]
            tokens = [at_input.tolist()] + finished.token_counts
        elif visual_index is not None:
            at_lm = (self._lm_input(visual_index) >= 0).sum(dim=1).tolist()
            last.visual_per_layer = [[count] * depth for count in at_lm]
        config = self.base.language_model.config
        compressed = total_flops(config, [t for layer in tokens for t in layer])
        uncompressed = depth * total_flops(config, original)
        last.flops = {"compressed": compressed, "uncompressed": uncompressed, "ratio": compressed / uncompressed}

    def _plan_units(
        self, embeds: torch.Tensor, visual: torch.Tensor, units: list[Unit]
    ) -> tuple[torch.Tensor, torch.Tensor, Plan | None]:
        """Run the method on every unit; units of one shape and budget share a batched call.

        Returns (keep [B, L] bool: non-visual tokens and kept visual ones, embeds with merged values
        written at kept positions, the Plan when all units formed one call else None).
        """
        keep = ~visual
        if self.layerwise is not None and "cls_attention" in self.layerwise.requires:  # for its key set
            score = torch.full(visual.shape, float("-inf"), device=visual.device)
            for unit in units:
                score[unit.sample, unit.positions] = unit.signals["cls_attention"].float()
            self._prefill.vision_score = score
        groups = same_shape([(unit.positions.numel(), unit.keep, unit.grid) for unit in units])
        plans = []
        for members in groups:
            count, grid = units[members[0]].keep, units[members[0]].grid
            if count == 0:
                continue
            rows = torch.tensor([units[i].sample for i in members], device=embeds.device).unsqueeze(1)
            cols = torch.stack([units[i].positions for i in members])  # [U, n]
            features = embeds[rows, cols]  # [U, n, D]
            with torch.no_grad():  # a choice has no gradient; merging (below) keeps the graph
                signals: dict[str, Any] = {"features": features.detach()}
                for name in self.method.requires:
                    if name != "features":
                        signals[name] = torch.stack([units[i].signals[name] for i in members])
                if grid is not None:
                    signals["grid"] = grid
                plan = self.method.plan(signals, count)
            if plan.merge_into is not None and not plan.is_identity and self.visual_aligned:
                raise ValueError(
                    f"method {self.method.name!r} merges tokens, but {type(self.model).__name__}'s language model also "
                    f"takes {list(self.visual_aligned)} per visual token, which vtc keeps but does not merge; use a "
                    "method that only selects tokens"
                )
            plans.append(plan)
            kept_cols = cols.gather(1, plan.kept)
            keep[rows.expand_as(kept_cols), kept_cols] = True
            if plan.merge_into is not None and not plan.is_identity:
                embeds = embeds.clone()
                embeds[rows.expand_as(kept_cols), kept_cols] = plan.apply(features)
        single = plans[0] if len(groups) == 1 and len(plans) == 1 else None
        return keep, embeds, single

    def _compression(
        self,
        visual: torch.Tensor,
        keep: torch.Tensor,
        images: list[Image],
        plan: Plan | None,
    ) -> Compression:
        """What the handle reports: per sample, the indices (among its visual tokens) that survive."""
        rank = visual.long().cumsum(dim=1) - 1
        self._prefill.visual_index = torch.where(visual, rank, -1)
        self._prefill.image_of = image_of = torch.full_like(rank, -1)
        for i, image in enumerate(images):
            image_of[image.sample, image.positions] = i

        def per_sample(video: bool) -> list[int]:
            samples = torch.tensor([image.sample for image in images if image.video == video], dtype=torch.long)
            return torch.bincount(samples, minlength=visual.shape[0]).tolist()

        survives = keep & visual
        kept = [rank[b][survives[b]] for b in range(visual.shape[0])]
        return Compression(
            kept,
            visual.sum(dim=1).tolist(),
            survives.sum(dim=1).tolist(),
            per_sample(False),
            plan,
            self.requires,
            dict(self.signal_sources),
            per_sample(True) if self.video_token_id is not None else None,
        )

    def _no_images(self, embeds: torch.Tensor) -> None:
        b = embeds.shape[0]
        empty = torch.empty(0, dtype=torch.long, device=embeds.device)
        videos = [0] * b if self.video_token_id is not None else None
        self.last = Compression([empty] * b, [0] * b, [0] * b, [0] * b, None, (), videos=videos)

    def _record_placeholders(self, bound: dict[str, Any], has_images: bool, has_videos: bool = False) -> None:
        """Called by the model pre-hook: remember where the image (and video) placeholders of this forward are
        (from input_ids, or by comparing inputs_embeds with the placeholder's embedding)."""
        self._visual = self._video_marks = None
        pairs = ((self.image_token_id, has_images), (self.video_token_id, has_videos))
        tokens = [token for token, present in pairs if present]
        if not tokens:
            return
        input_ids = bound.get("input_ids")
        if input_ids is not None:
            marks = {token: input_ids == token for token in tokens}
        else:
            embeds = bound["inputs_embeds"]
            table = self.base.get_input_embeddings()
            marks = {token: (embeds == table(torch.tensor(token, device=embeds.device))).all(-1) for token in tokens}
        self._visual = torch.stack(list(marks.values())).any(0)
        self._video_marks = marks.get(self.video_token_id) if has_videos else None

    def _take_placeholders(self, embeds: torch.Tensor) -> torch.Tensor | None:
        """The placeholder mask of this forward, once (None if it holds no image tokens)."""
        visual, self._visual = self._visual, None
        if visual is None or visual.shape != embeds.shape[:2] or not bool(visual.any()):
            return None
        return visual

    def _continues_prefill(self, embeds: torch.Tensor) -> bool:
        """True when a forward over a non-empty cache carries visual tokens."""
        return self._take_placeholders(embeds) is not None


def sliding_window(config: Any) -> int | None:
    """The window of a language model's sliding-window layers (Mistral: every layer; Qwen2 / Qwen3 / GPT-OSS: the
    ``layer_types`` marked "sliding_attention"), or None when every layer attends to the whole sequence."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def match_images(first: torch.Tensor, seen: torch.Tensor, fits: Callable[[int, int], bool] | None = None) -> list[int]:
    """For each image of a prefill, given by its first token ``first`` [I, D], the index of the image the vision
    encoder saw with exactly that first token (``seen`` [I_vision, D]; ``fits(i, j)`` may require more): generate()
    repeats images for beam search and num_return_sequences, so several may map to one."""
    same = (first.unsqueeze(1) == seen.to(first.dtype).unsqueeze(0)).all(-1)  # [I, I_vision]
    matches = []
    for i, row in enumerate(same):
        found = [j for j in row.nonzero().squeeze(1).tolist() if fits is None or fits(i, j)]
        if not found:
            raise ValueError(
                f"vtc could not match image {i} of the {first.shape[0]} images in the prompt to one of the "
                f"{seen.shape[0]} images the vision encoder saw"
            )
        matches.append(found[0])
    return matches
