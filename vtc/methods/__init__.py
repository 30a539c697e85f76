"""Compression methods: one dataclass per file, each registered by its ``@register`` line (vtc.registry).

Importing this package imports every method file, which fills the registry.
"""

from vtc.methods.adaptive import Adaptive
from vtc.methods.base import SIGNALS, Budget, Method, Plan, ScoredMethod
from vtc.methods.dart import DART
from vtc.methods.dart_llm import DARTLLM
from vtc.methods.divprune import DivPrune
from vtc.methods.evs import EVS
from vtc.methods.fastervlm import FasterVLM
from vtc.methods.fastv import FastV
from vtc.methods.layerwise import LayerwiseMethod, Stage
from vtc.methods.pdrop import PDrop
from vtc.methods.random import Random
from vtc.methods.uniform import Uniform
from vtc.methods.vtc_cls import VTCCLS

__all__ = [
    "SIGNALS",
    "DART",
    "DARTLLM",
    "EVS",
    "VTCCLS",
    "Adaptive",
    "Budget",
    "DivPrune",
    "FastV",
    "FasterVLM",
    "LayerwiseMethod",
    "Method",
    "PDrop",
    "Plan",
    "Random",
    "ScoredMethod",
    "Stage",
    "Uniform",
]
