"""The identity: every visual token reaches the language model (the pre-LLM stage of an in-LLM-only call)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vtc.methods.base import Method, Plan, batch_size, num_tokens, signal_device


@dataclass
class KeepAll(Method):
    """Keeps all N tokens; used when only an in-LLM method is attached (``vtc.compress(model, "fastv", ...)``)."""

    name = "none"
    requires = ()

    def _plan(self, signals: dict[str, Any], keep: int) -> Plan:
        n = num_tokens(signals)
        return Plan(torch.arange(n, device=signal_device(signals)).expand(batch_size(signals), n).clone(), n)
