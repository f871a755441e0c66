"""What the parity suite compares: logits of a transformers model, and the error measure over them.

rel_err = max|ours - theirs| / max|theirs|; the bounds are the tests' own (1e-4 for fp32 models, which
differ only in summation order). A parity test must also show that what it compares matters:
`assert_adapted` fails when an adapter was silently dropped.
"""

import numpy as np
import torch


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def ids(seed=0, seq=12) -> np.ndarray:
    """A (2, seq) batch of token ids in [3, 256): no pad, bos or eos."""
    return np.random.default_rng(seed).integers(3, 256, (2, seq))


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def assert_adapted(adapted, base) -> None:
    """The adapter must matter: a parity test that passes with the adapter dropped proves nothing."""
    assert rel_err(adapted, base) > 1e-2
