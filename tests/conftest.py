import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the kernel tests (tests/kernels) run Triton's CPU interpreter. Triton reads
# TRITON_INTERPRET when it decorates a kernel, its own library included at `import triton`, and test
# modules import triton indirectly while being collected (transformers' model classes do), so the
# variable is set here, before any of them. With CUDA the kernels are compiled and run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
