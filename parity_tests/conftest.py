"""Session settings for the PyTorch-reference parity tests. torch_ref changes no global state on import;
the test session makes its choices here (HF_HUB_OFFLINE is set for both suites in the root conftest.py).

torch runs on one thread: torch.mean's float32 summation order (the double-quantization offset) and so its
last bit depend on the thread count, and jaxlora reproduces the single-thread order.
"""

import torch

torch.set_num_threads(1)
