"""The contract every compression method follows.

A method turns plain tensors ("signals") about the visual tokens of a batch of images into a
:class:`Plan`: which tokens survive, and optionally which dropped token merges into which kept one.
Methods import torch only; adapters obtain the signals from a model and apply the plan.
"""

from __future__ import annotations

import math
import numbers
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from vtc import kernels as ops

# Signal name -> what it holds. Adapters provide a subset; methods declare what they require.
SIGNALS: dict[str, str] = {
    "features": "[B, N, D] visual tokens as the language model receives them (after the projector)",
    "cls_attention": "[B, N] attention of the vision encoder's [CLS] query over the visual tokens at the "
    "feature layer, mean over heads",
    "cls_attention_layers": "[B, V, N] the same at every vision layer up to the feature layer (row i = layer i, "
    "the feature layer is row V-1)",
    "attention_received": "[B, N] mean attention each visual token receives from all patch queries at a late "
    "full-attention vision block, mean over heads (towers without [CLS], e.g. Qwen2-VL)",
    "protected": "[B, N] bool, tokens that must be kept (optional)",
    "grid": "(H, W) the token grid of one image, or (T, H, W) of one video (T frames = temporal patches, each an "
    "H x W grid, tokens frame after frame in raster order: index t*H*W + h*W + w); the product == N (optional; "
    "square image grids are inferred)",
}
OPTIONAL_SIGNALS = ("protected", "grid")


@dataclass(frozen=True)
class Budget:
    """How many visual tokens to keep per image: an exact count ``keep`` or a fraction ``ratio``."""

    keep: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.ratio is None):
            raise ValueError(
                f"give exactly one of keep= (tokens kept per image) or ratio= (fraction kept), "
                f"got keep={self.keep!r}, ratio={self.ratio!r}"
            )
        # Any integral type for keep (int, numpy / torch integer scalars), any real one for ratio; stored as
        # Python numbers so that every later use is plain arithmetic.
        if self.keep is not None:
            keep = _integral(self.keep)
            if keep is None or keep < 1:
                raise ValueError(f"keep must be an int >= 1 (visual tokens kept per image), got {self.keep!r}")
            object.__setattr__(self, "keep", keep)
        if self.ratio is not None:
            ratio = _real(self.ratio)
            if ratio is None or not math.isfinite(ratio) or not 0 < ratio <= 1:
                raise ValueError(
                    f"ratio must be a number in (0, 1] (fraction of visual tokens kept), got {self.ratio!r}"
                )
            object.__setattr__(self, "ratio", ratio)

    def tokens(self, num_tokens: int) -> int:
        """Kept count for an image of ``num_tokens`` visual tokens (ratio: round(ratio * N), at least 1)."""
        if self.keep is not None:
            if self.keep > num_tokens:
                raise ValueError(
                    f"keep={self.keep} exceeds the {num_tokens} visual tokens per image; use keep <= {num_tokens}"
                )
            return self.keep
        return max(1, round(self.ratio * num_tokens))

    def cap(self, num_tokens: int) -> int:
        """Kept count for an image of ``num_tokens`` where images differ in size: ``keep`` is a cap (an image with
        fewer tokens is kept whole); a ratio as in :meth:`tokens`."""
        return min(self.keep, num_tokens) if self.keep is not None else self.tokens(num_tokens)

    def __str__(self) -> str:
        return f"keep={self.keep}" if self.keep is not None else f"ratio={self.ratio}"


def _integral(value: Any) -> int | None:
    """``value`` as an int if it is an integer of any type (not a bool, not a float such as 6.0), else None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number of any type (numpy, torch scalars too; not a bool), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


@dataclass(frozen=True)
class Plan:
    """Which of the N visual tokens of each image survive.

    Attributes:
        kept: [B, K] sorted indices of the kept tokens.
        num_tokens: N, tokens per image before compression.
        merge_into: [B, N] or None. When set, every token's value is size-weighted-averaged into the
            kept token at slot ``merge_into[b, i]`` (0..K-1); kept tokens map to their own slot.
    """

    kept: torch.Tensor
    num_tokens: int
    merge_into: torch.Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return self.kept.shape[1] == self.num_tokens

    @property
    def sizes(self) -> torch.Tensor:
        """[B, K] how many original tokens each kept token stands for (sums to N per row)."""
        if self.merge_into is None:
            return torch.ones(self.kept.shape, dtype=torch.long, device=self.kept.device)
        counts = torch.zeros(self.kept.shape, dtype=torch.long, device=self.kept.device)
        return counts.scatter_add_(1, self.merge_into, torch.ones_like(self.merge_into))

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, K, D]: the kept tokens, merged groups averaged by size."""
        if self.merge_into is None:
            return ops.gather_rows(features, self.kept)
        return ops.merge_rows(features, self.kept, self.merge_into)


class Method(ABC):
    """Base of all methods. Subclasses are dataclasses whose fields are the hyper-parameters.

    Subclasses set ``name``, ``requires`` (signal names) and implement :meth:`_plan`. The public
    :meth:`plan` validates signals, enforces keep-all as the identity and the protected-count bound.
    """

    name: ClassVar[str]
    stage: ClassVar[str] = "pre"  # where it runs: before the language model
    requires: ClassVar[tuple[str, ...]] = ("features",)
    temporal: ClassVar[bool] = False  # needs a video's (T, H, W) grid: plans over frames

    @abstractmethod
    def _plan(self, signals: dict[str, Any], keep: int) -> Plan:
        """Choose ``keep`` tokens (1 <= keep < N; signals validated and fp32)."""

    def plan(self, signals: dict[str, Any], keep: int) -> Plan:
        signals = check_signals(self, signals)
        if self.temporal:
            check_video_grid(self, signals.get("grid"))
        n = num_tokens(signals)
        if not 1 <= keep <= n:
            raise ValueError(f"keep must be in [1, {n}] for {n} visual tokens, got {keep}")
        if keep == n or batch_size(signals) == 0:  # an empty batch keeps [0, keep]: nothing to choose from
            kept = torch.arange(n, device=signal_device(signals))[:keep].expand(batch_size(signals), keep)
            return Plan(kept.clone(), n)
        protected = signals.get("protected")
        if protected is not None and int(protected.sum(dim=1).max()) > keep:
            raise ValueError(f"{int(protected.sum(dim=1).max())} tokens are protected but only keep={keep} are kept")
        return self._plan(signals, keep)

    def check_video(self, grid: tuple[int, int, int], keep: int) -> None:  # noqa: B027 - optional hook
        """Raise if the method cannot keep ``keep`` tokens of a video of (T, H, W) ``grid`` (evs: fewer than one
        frame's). Adapters call it once a video's grid is known, before its vision pass where they can."""

    def check_geometry(self, num_tokens: int | None, vision_layers: int | None) -> None:  # noqa: B027 - optional hook
        """Raise if the method's options cannot work with N tokens per image and ``vision_layers``
        vision layers up to the feature layer (each None if unknown or varying). Called at attach time."""

    def select(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        """[B, keep] sorted kept indices."""
        return self.plan(signals, keep).kept

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]


class ScoredMethod(Method):
    """Top-k pruning by a per-token score: implement :meth:`score`. Protected tokens always win."""

    @abstractmethod
    def score(self, signals: dict[str, Any], keep: int) -> torch.Tensor:
        """[B, N] fp32, higher = more worth keeping."""

    def _plan(self, signals: dict[str, Any], keep: int) -> Plan:
        score = self.score(signals, keep)
        if signals.get("protected") is None:
            return Plan(score.topk(keep, dim=1).indices.sort(dim=1).values, score.shape[1])
        chosen = protected_mask(signals, score.shape)
        chosen = ops.fill_top(chosen, score, keep - chosen.sum(dim=1))
        return Plan(ops.mask_to_indices(chosen), score.shape[1])


def protected_mask(signals: dict[str, Any], shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    protected = signals.get("protected")
    if protected is None:
        return torch.zeros(shape, dtype=torch.bool, device=signal_device(signals))
    return protected.clone()


def signal_device(signals: dict[str, Any]) -> torch.device:
    return next(v.device for v in signals.values() if isinstance(v, torch.Tensor))


def batch_size(signals: dict[str, Any]) -> int:
    return next(v.shape[0] for k, v in signals.items() if isinstance(v, torch.Tensor))


def num_tokens(signals: dict[str, Any]) -> int:
    return next(
        v.shape[-1] if k != "features" else v.shape[1] for k, v in signals.items() if isinstance(v, torch.Tensor)
    )


_NDIM = {"features": 3, "cls_attention": 2, "cls_attention_layers": 3, "attention_received": 2, "protected": 2}


def check_signals(method: Method, signals: dict[str, Any]) -> dict[str, Any]:
    """Validate names, ranks, shapes and the values the method reads; return a copy with float signals in fp32.

    Both vtc.select and the adapters (through :meth:`Method.plan`) come here. A signal the method
    requires must be finite: a token ranked by NaN or inf has no place in an order (NaN wins an argmax,
    inf ties), so the error comes here, naming the signal and its rows. Signals the method does not read
    (e.g. features for "random") are carried as they are.
    """
    unknown = sorted(set(signals) - set(SIGNALS))
    if unknown:
        raise ValueError(
            f"unknown signal(s) {unknown}; known signals: {sorted(SIGNALS)}. "
            f"Method options go to the method: vtc.get_method({method.name!r}, option=...)"
        )
    missing = [name for name in method.requires if signals.get(name) is None]
    if missing:
        described = "; ".join(f"{name}: {SIGNALS[name]}" for name in missing)
        raise ValueError(f"method {method.name!r} needs signal(s) {missing} ({described})")
    out: dict[str, Any] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name, value in signals.items():
        if value is None:
            continue
        if name == "grid":
            out[name] = check_grid(value)
            continue
        if not isinstance(value, torch.Tensor) or value.ndim != _NDIM[name]:
            raise ValueError(f"signal {name!r} must be a {_NDIM[name]}-D tensor {SIGNALS[name].split(' ')[0]}")
        if name == "protected":
            value = value.bool()
        elif not value.is_floating_point():
            raise ValueError(f"signal {name!r} must be a floating-point tensor, got {value.dtype}")
        else:
            source, value = value, value.float()
            if name in method.requires:
                check_finite(method, name, value, source)
        out[name] = value
        shapes[name] = (value.shape[0], value.shape[1] if name == "features" else value.shape[-1])
    if len(set(shapes.values())) > 1:
        raise ValueError(f"signals disagree on [batch, tokens]: {shapes}")
    if not shapes:
        raise ValueError(
            f"method {method.name!r} got no tensor signal: pass at least one (e.g. features [B, N, D]) so that "
            "the batch size and token count are known"
        )
    n = next(iter(shapes.values()))[1]
    if n < 1:
        raise ValueError("there are no visual tokens to select from (N == 0)")
    if "grid" in out and math.prod(out["grid"]) != n:
        raise ValueError(f"grid {out['grid']} does not cover the {n} visual tokens")
    return out


def check_grid(grid: Any) -> tuple[int, ...]:
    """``grid`` as a tuple of 2 ints (H, W: an image) or 3 (T, H, W: a video), each >= 1; a ValueError otherwise."""
    try:
        ints = None if isinstance(grid, (str, bytes)) else [_integral(v) for v in grid]
    except TypeError:  # not iterable
        ints = None
    if ints is None or len(ints) not in (2, 3) or any(v is None or v < 1 for v in ints):
        raise ValueError(f"signal 'grid' must be (H, W) for an image or (T, H, W) for a video, ints >= 1, got {grid!r}")
    return tuple(ints)


def check_video_grid(method: Method, grid: tuple[int, ...] | None) -> None:
    """Raise unless ``grid`` is a video's (T, H, W): what a temporal method plans over."""
    if grid is not None and len(grid) == 3:
        return
    given = "no grid" if grid is None else f"the 2-D grid {grid}"
    raise ValueError(
        f"method {method.name!r} is temporal: it needs a video unit with a (T, H, W) grid (T frames of H x W "
        f"tokens, T >= 2 to prune anything), got {given}. Images and video_budget='per_frame' hand (H, W) grids and "
        f"cannot use it; choose a spatial method for them (e.g. 'divprune', 'uniform')"
    )


def check_finite(method: Method, name: str, value: torch.Tensor, source: torch.Tensor) -> None:
    """Raise a ValueError naming the batch rows of ``value`` ([B, ...] fp32, converted from ``source``)
    that hold NaN or inf.

    One pass (and one host sync) when all is well; the details are computed only on failure. Large
    finite values (bf16 features can reach 3e38) pass: the ops handle them.
    """
    if bool(torch.isfinite(value).all()):
        return
    bad = ~torch.isfinite(value)
    rows = bad.flatten(1).any(dim=1).nonzero().flatten().tolist()
    shown = rows if len(rows) <= 16 else [*rows[:16], "..."]
    kinds = {"NaN": value.isnan(), "+inf": value == float("inf"), "-inf": value == float("-inf")}
    found = ", ".join(f"{int(mask.sum())} {kind}" for kind, mask in kinds.items() if bool(mask.any()))
    widened = (
        f" ({source.dtype} values beyond the fp32 range, which vtc converts signals to)"
        if source.dtype != value.dtype and bool(torch.isfinite(source).all())
        else ""
    )
    raise ValueError(
        f"signal {name!r} of shape {tuple(value.shape)} holds non-finite values ({found}) in batch row(s) {shown} "
        f"of {value.shape[0]}{widened}. Method {method.name!r} ranks tokens by it, and NaN / inf scores would "
        f"decide which tokens survive. Find where they come from (e.g. an fp16 overflow in the vision tower or "
        f"projector: run it in bf16 or fp32) or replace them before selecting (e.g. torch.nan_to_num)."
    )
