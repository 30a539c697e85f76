"""Triton kernels for vtc.kernels, one file per op; imported only when a Triton backend call needs them.

Each module holds ``_<op>_kernel`` functions (@triton.jit) and a launcher with the public op's
signature (without ``backend``). Call the public ops in vtc.kernels instead: they dispatch.
"""
