"""Compression methods: one dataclass per file, registered in vtc.registry."""

from vtc.methods.base import SIGNALS, Budget, Method, Plan, ScoredMethod
from vtc.methods.dart import DART
from vtc.methods.divprune import DivPrune
from vtc.methods.fastervlm import FasterVLM
from vtc.methods.random import Random
from vtc.methods.uniform import Uniform
from vtc.methods.vtc_cls import VTCCLS

__all__ = [
    "SIGNALS",
    "Budget",
    "Method",
    "Plan",
    "ScoredMethod",
    "DART",
    "DivPrune",
    "FasterVLM",
    "Random",
    "Uniform",
    "VTCCLS",
]
