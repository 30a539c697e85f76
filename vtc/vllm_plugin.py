"""vtc inside vLLM: pre-LLM compression of image tokens, as an out-of-tree vLLM plugin.

    vllm serve DIR --hf-overrides '{"vtc": {"method": "divprune", "keep": 64}}'
    vllm.LLM(model=DIR, hf_overrides={"vtc": {"method": "dart", "ratio": 0.25, "merge": true}})

Installing vtc registers :func:`register` under vLLM's ``vllm.general_plugins`` entry point; vLLM calls it in every
process it starts. It replaces the model classes of the families below with subclasses
(:mod:`vtc.vllm_models`) that behave exactly as vLLM's own until a model's config carries a ``vtc`` entry, which the
one flag ``hf_overrides`` puts there: ``method`` (a pre-LLM method of :func:`vtc.list_methods`), ``keep`` or
``ratio``, optionally ``positions`` and the method's options (``merge``, ``signal``, ...).

How the plugin works:
- *Placeholders:* vLLM reserves an image's placeholder tokens in its processor, before the vision encoder runs, so the
  kept count is a pure function of the image's token count and the budget. Each image's placeholders are cut to it.
- *Selection:* the subclass's ``embed_multimodal`` runs the vision encoder and the projector, takes the method's
  signals (``features``; LLaVA's [CLS] attention off its CLIP tower) and applies the method's plan, through the same
  ``Method.plan`` / ``Plan.apply`` as :func:`vtc.compress`.
- *Positions:* vLLM numbers a 1-D RoPE prompt by sequence index, so on LLaVA the kept tokens are numbered as if the
  dropped ones had never been there (``positions="compact"``, the only choice). On Qwen2-VL / Qwen2.5-VL (M-RoPE) the
  kept tokens keep their (t, h, w) grid positions (``positions="original"``, the only choice): the text's positions
  do not depend on which tokens are kept and are laid out when the request arrives; each kept token's own position
  rides on its embedding and vLLM's multimodal-pruning hook (``recompute_mrope_positions``, the hook of its video
  pruning EVS) writes it in, chunk by chunk.

Everything that cannot work is refused when the engine starts: a family the plugin does not cover, a vLLM other than
0.32, an unknown or in-LLM method, a method whose signals the family cannot give, keep above an image's tokens
(LLaVA's fixed count), a ``positions`` the family cannot honour. Per request (an error for that request, before
anything of it is processed): precomputed image embeddings, and a Qwen prompt that ends with an image placeholder.
Video inputs of the Qwen families are disabled (a limit of 0) while vtc is on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from vtc.adapters.llava import tokens_per_image
from vtc.methods.base import Budget, Method
from vtc.methods.layerwise import LayerwiseMethod
from vtc.registry import get_method, list_methods

logger = logging.getLogger("vllm.vtc")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply

KEY = "vtc"  # hf_overrides={"vtc": {...}}


@dataclass(frozen=True)
class Family:
    """A family the plugin covers: its vLLM class, what signals it gives, how it numbers positions."""

    vtc_class: str  # in vtc.vllm_models
    provides: tuple[str, ...]
    positions: str
    video: bool = False  # the family takes video inputs, which the plugin disables while vtc is on


FAMILIES = {
    "LlavaForConditionalGeneration": Family(
        "VtcLlavaForConditionalGeneration", ("features", "grid", "cls_attention", "cls_attention_layers"), "compact"
    ),
    "Qwen2VLForConditionalGeneration": Family(
        "VtcQwen2VLForConditionalGeneration", ("features", "grid"), "original", video=True
    ),
    "Qwen2_5_VLForConditionalGeneration": Family(
        "VtcQwen2_5_VLForConditionalGeneration", ("features", "grid"), "original", video=True
    ),
}
POSITION_REASONS = {
    "compact": "vLLM numbers a 1-D RoPE prompt by sequence index, so the kept tokens follow each other",
    "original": "M-RoPE gives the kept tokens their (t, h, w) grid positions, and the text after an image starts at "
    "the grid's extent whatever the image's token count, so there is no gap to close",
}


@dataclass(frozen=True)
class Settings:
    """A model's vtc setting, checked: the method, its budget, and the positions."""

    method: Method
    budget: Budget
    positions: str

    def count(self, num_tokens: int) -> int:
        """Tokens an image of ``num_tokens`` keeps: ``keep`` caps it (a smaller image stays whole), or ``ratio``."""
        return self.budget.cap(num_tokens)

    def __str__(self) -> str:
        return f"{self.method.name} ({self.budget}, positions={self.positions})"


def settings(hf_config: Any) -> Settings | None:
    """The checked vtc setting of a vLLM model's (Hugging Face) config, None when it has none. Raises ValueError,
    naming what is allowed, for anything the plugin cannot run."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    architectures = list(getattr(hf_config, "architectures", None) or [])
    family = FAMILIES.get(architectures[0]) if architectures else None
    if family is None:
        raise ValueError(
            f"vtc's vLLM plugin does not cover {architectures or type(hf_config).__name__}; it covers "
            f"{sorted(FAMILIES)}. Remove the {KEY!r} entry of hf_overrides to serve this model uncompressed"
        )
    if not isinstance(raw, dict):
        raise ValueError(f'hf_overrides {{"{KEY}": ...}} must be a dict such as {{"method": "divprune", "keep": 64}}')
    options = dict(raw)
    name = options.pop("method", None)
    keep, ratio = options.pop("keep", None), options.pop("ratio", None)
    positions = options.pop("positions", family.positions)
    pre = list_methods("pre", images=True)  # the plugin compresses images only
    if not isinstance(name, str):
        raise ValueError(f"the {KEY!r} setting needs a method name, one of the pre-LLM methods {pre}, got {name!r}")
    method = get_method(name, **options)  # unknown names and options raise, naming what exists
    if isinstance(method, LayerwiseMethod):
        raise ValueError(
            f"{name!r} drops tokens inside the language model, which vLLM's paged KV cache and chunked prefill do not "
            f"allow; the vLLM plugin runs the pre-LLM methods {pre}"
        )
    if method.temporal:
        raise ValueError(
            f"{name!r} plans over a video's frames, and the vLLM plugin compresses images only (video inputs are "
            f"disabled while vtc is on); use one of the pre-LLM methods {pre}"
        )
    budget = Budget(keep=keep, ratio=ratio)
    missing = [signal for signal in method.requires if signal not in family.provides]
    if missing:
        usable = [m for m in pre if set(get_method(m).requires) <= set(family.provides)]
        raise ValueError(
            f"{name!r} needs {missing}, which the vLLM plugin does not compute for {architectures[0]} (it gives "
            f"{list(family.provides)}); methods that run there: {usable}"
        )
    if positions != family.positions:
        raise ValueError(
            f"positions={positions!r} is not possible for {architectures[0]} in vLLM, only {family.positions!r}: "
            f"{POSITION_REASONS[family.positions]}"
        )
    checked = Settings(method, budget, positions)
    tokens = fixed_image_tokens(hf_config)
    if tokens is not None:
        checked.budget.tokens(tokens)  # keep above a fixed-size image's tokens raises
    return checked


def fixed_image_tokens(hf_config: Any) -> int | None:
    """Visual tokens per image of a family whose images all have as many (LLaVA-1.5), else None."""
    return tokens_per_image(hf_config) if getattr(hf_config, "model_type", None) == "llava" else None


# The vLLM versions vtc's classes are written against: they subclass vLLM's model classes and use its multimodal
# pruning hook, whose names and signatures vLLM does not keep stable.
SUPPORTED_VLLM = "0.32."

_registered = False
_lock = threading.Lock()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vtc's model classes replace vLLM's for the covered families (they
    act as vLLM's own until a config has a ``vtc`` entry), and engine configs are checked as they are built. On a
    vLLM other than 0.32 it replaces nothing, and a config with a ``vtc`` entry is refused."""
    global _registered
    with _lock:
        if _registered:  # vLLM calls plugins once per process, possibly more: make it idempotent
            return
        import vllm
        from vllm.config.model import ModelConfig

        supported = vllm.__version__.startswith(SUPPORTED_VLLM)
        if supported:
            from vllm import ModelRegistry
            from vllm.config.multimodal import MultiModalConfig

            for architecture, family in FAMILIES.items():
                ModelRegistry.register_model(architecture, f"vtc.vllm_models:{family.vtc_class}")
            _allow_position_rewrites(MultiModalConfig)
            _cpu_runner_rewrites_positions()
        _check_model_configs(ModelConfig, None if supported else vllm.__version__)
        _registered = True


def _check_model_configs(model_config_class: type, unsupported: str | None) -> None:
    """Every ModelConfig vLLM builds is checked once built, so a bad setting stops the engine before it starts
    (``unsupported``: the vLLM version, when vtc's classes are not registered: any vtc entry is refused)."""
    post_init = model_config_class.__post_init__

    def checked_post_init(self, *args: Any, **kwargs: Any) -> None:
        post_init(self, *args, **kwargs)
        if unsupported is not None and getattr(self.hf_config, KEY, None) is not None:
            raise ValueError(
                f"vtc's vLLM plugin runs on vLLM {SUPPORTED_VLLM}x, this is vLLM {unsupported}: install vllm "
                f"{SUPPORTED_VLLM}x (pip install 'vtc[vllm]'), or remove the {KEY!r} entry of hf_overrides"
            )
        setting = settings(self.hf_config)
        if setting is None:
            return
        family = FAMILIES[self.hf_config.architectures[0]]
        if family.video and self.multimodal_config is not None:
            from vllm.config.multimodal import VideoDummyOptions

            if self.multimodal_config.get_limit_per_prompt("video") != 0:
                logger.warning("vtc compresses images only: video inputs are disabled (limit 0) while vtc is on")
                self.multimodal_config.limit_per_prompt["video"] = VideoDummyOptions(count=0)
        logger.info("vtc: %s compresses the images of %s", setting, self.model)

    model_config_class.__post_init__ = checked_post_init


POSITIONS_FROM_EMBEDDINGS = "_vtc_positions_from_embeddings"  # set on a MultiModalConfig by vtc's Qwen classes


def _allow_position_rewrites(multimodal_config_class: type) -> None:
    """vLLM rewrites M-RoPE positions from the embeddings (``recompute_mrope_positions``) only when multimodal pruning
    is on, which its config ties to video pruning; vtc's Qwen classes turn it on for their own config."""
    enabled = multimodal_config_class.is_multimodal_pruning_enabled

    def is_multimodal_pruning_enabled(self) -> bool:
        return enabled(self) or bool(getattr(self, POSITIONS_FROM_EMBEDDINGS, False))

    multimodal_config_class.is_multimodal_pruning_enabled = is_multimodal_pruning_enabled


def _cpu_runner_rewrites_positions() -> None:
    """vLLM 0.32's GPU runner reads, once the model is loaded, whether it rewrites M-RoPE positions from the
    embeddings; its CPU runner overrides ``load_model`` and never does. For vtc's Qwen classes it does here."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a vLLM build without the CPU runner
        return
    load_model = CPUModelRunner.load_model

    def load_model_with_position_rewrites(self, *args: Any, **kwargs: Any) -> None:
        load_model(self, *args, **kwargs)
        config = self.model_config.multimodal_config
        if config is not None and getattr(config, POSITIONS_FROM_EMBEDDINGS, False):
            self.is_multimodal_pruning_enabled = True

    CPUModelRunner.load_model = load_model_with_position_rewrites
