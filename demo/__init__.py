"""The vtc demo: ``python -m demo`` serves a page that shows what compression does to a VLM's answer, its speed and
the image patches the model still looks at. :mod:`demo.core` and :mod:`demo.render` hold the computation and the
pictures (no gradio); :mod:`demo.app` is the page.
"""

from __future__ import annotations

import os

# Gradio reads these when it is imported: no analytics, no hub calls, no telemetry.
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def offline() -> None:
    """Set gradio / Hugging Face Hub offline settings (call before importing gradio); values already set are kept."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
