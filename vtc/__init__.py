"""vtc: training-free visual token compression for Hugging Face vision-language models.

    handle = vtc.compress(model, "dart", keep=64)
    model.generate(**inputs)
    handle.remove()

Importing vtc patches nothing.
"""

from vtc.api import CompressionHandle, compress, select
from vtc.methods.base import SIGNALS, Budget, Method, Plan, ScoredMethod
from vtc.methods.layerwise import LayerwiseMethod
from vtc.registry import get_method, list_methods, list_models, register, register_family

__version__ = "0.1.0"

__all__ = [
    "SIGNALS",
    "Budget",
    "CompressionHandle",
    "LayerwiseMethod",
    "Method",
    "Plan",
    "ScoredMethod",
    "compress",
    "get_method",
    "list_methods",
    "list_models",
    "register",
    "register_family",
    "select",
]
