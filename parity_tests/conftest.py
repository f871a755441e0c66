"""Fixtures for the PyTorch-reference parity tests.

torch runs on one thread: torch.mean's float32 summation order (the double-quantization offset) and
so its last bit depend on the thread count, and jaxlora reproduces the single-thread order.
"""

import torch

torch.set_num_threads(1)
