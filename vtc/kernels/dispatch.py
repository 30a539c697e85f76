"""Backend choice for the ops in vtc.kernels: ``backend="auto" | "torch" | "triton"``.

- ``"torch"``: the pure-torch reference (vtc/kernels/reference.py), any device.
- ``"triton"``: the Triton kernel; raises a clear error when it cannot run (Triton not importable,
  tensors not on CUDA outside the interpreter, unsupported dtype or size).
- ``"auto"``: Triton when every tensor is on CUDA, the kernel can run and was not measured slower than
  torch on such input (``slower``), else torch (CPU tensors are decided without importing Triton). The reason
  for using torch is logged once per distinct reason (logger ``vtc.kernels``): at WARNING when CUDA tensors miss
  the kernels, at INFO otherwise.

``TRITON_INTERPRET=1`` (read by Triton when the kernel modules are first imported, i.e. at the first
Triton-backend call) runs the kernels on CPU tensors; ``backend="triton"`` then accepts CPU tensors,
``"auto"`` still picks Triton only for CUDA tensors. Nothing is swapped at import: each call decides.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import torch

logger = logging.getLogger("vtc.kernels")

BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_logged: set[str] = set()


@functools.cache
def triton_import_error() -> str | None:
    """None if ``import triton`` works, else why not (cached; tests clear the cache)."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        return f"{type(error).__name__}: {error}"
    return None


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a kernel is decorated, so once vtc's kernel modules are imported
    their mode is fixed; that mode wins over the current environment.
    """
    utils = sys.modules.get("vtc.kernels.triton._utils")
    if utils is not None:
        return bool(utils.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_library_interpreted() -> bool:
    """Triton decorates its own library (tl.zeros, ...) at import; the interpreter cannot call a
    library function decorated for compilation."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _why_not(tensors: tuple[torch.Tensor, ...], floats: tuple[torch.Tensor, ...], limit: str | None) -> str | None:
    """Why the Triton kernel cannot run on these tensors (None: it can)."""
    error = triton_import_error()
    if error is not None:
        return f"triton is not importable ({error}); pip install 'vtc[triton]' for the kernels"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors are on different devices {sorted(str(d) for d in devices)}"
    device = next(iter(devices))
    if device.type != "cuda" and not interpreting():
        return f"tensors are on {device.type}, the triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    if interpreting() and not _triton_library_interpreted():
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before anything imports triton"
    for t in floats:
        if t.dtype not in DTYPES:
            return f"dtype {t.dtype} is not supported by the triton kernels (float32, float16, bfloat16)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in floats):
        return "an input requires grad and the triton kernels have no backward; the torch ops keep the graph"
    return limit


def use_triton(
    op: str,
    backend: str,
    tensors: tuple[torch.Tensor, ...],
    floats: tuple[torch.Tensor, ...] = (),
    limit: str | None = None,
    slower: str | None = None,
) -> bool:
    """Decide whether ``op`` runs its Triton kernel.

    Args:
        op: public op name, for messages.
        backend: "auto", "torch" or "triton".
        tensors: every tensor argument (device check).
        floats: the floating tensors whose dtype the kernel must support.
        limit: an op-specific reason the kernel cannot take this input (e.g. too many tokens), or None.
        slower: why the torch op is faster on this input (benchmarks/kernel_ops.py), or None. Only "auto" reads
            it; backend="triton" still runs the kernel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    quiet = False  # a choice made for speed is logged at INFO
    if backend == "auto" and not all(t.is_cuda for t in tensors):
        # Decided before importing triton: CPU work never pays for the import.
        reason = f"tensors are on {tensors[0].device.type}; auto uses the triton kernels for CUDA tensors only"
    else:
        reason = _why_not(tensors, floats, limit)
        if reason is None and (backend == "triton" or slower is None):
            return True
        if reason is None:
            reason, quiet = slower, True
    if backend == "triton":
        raise RuntimeError(f"vtc.kernels.{op}(backend='triton') cannot run: {reason}. Use backend='auto' or 'torch'.")
    if reason not in _logged:
        _logged.add(reason)
        on_cuda = any(t.is_cuda for t in tensors)
        level = logging.WARNING if on_cuda and not quiet else logging.INFO
        logger.log(level, "vtc.kernels: using the torch ops: %s", reason)
    return False
