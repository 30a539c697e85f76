"""The vtc demo: ``vtc demo`` serves a page that shows what compression does to a VLM's answer, its speed and the
image patches the model still looks at. :mod:`vtc.demo.core` and :mod:`vtc.demo.render` hold the computation and the
pictures (no gradio); :mod:`vtc.demo.app` is the page. Needs the demo extra: ``pip install "vtc[demo]"``.
"""

from __future__ import annotations

import importlib
import os
import sys

# Gradio reads these when it is imported: no analytics, no hub calls, no telemetry.
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def offline() -> None:
    """Set gradio / Hugging Face Hub offline settings (call before importing gradio); values already set are kept.

    huggingface_hub reads its settings once, when imported, and importing vtc has imported it (through transformers):
    its constants are read again from the environment."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        importlib.reload(hub_constants)
