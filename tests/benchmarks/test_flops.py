"""benchmarks/flops.py: dot FLOPs of compiled programs, with while bodies counted once per trip."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.flops import hlo_dot_flops, step_flops

M, K, N = 32, 48, 64


def _compiled(fn, *shapes):
    return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile()


def test_one_dot():
    compiled = _compiled(lambda a, b: a @ b, (M, K), (K, N))
    assert hlo_dot_flops(compiled.as_text()) == 2 * M * K * N


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_scan_body_counted_per_iteration(layers):
    def f(h, ws):  # h (M, K); ws (layers, K, K): a scan as the decoder's, with an elementwise op between dots
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, ws)[0]

    compiled = _compiled(f, (M, K), (layers, K, K))
    got = step_flops(compiled)
    assert got["flops"] == layers * 2 * M * K * K
    # What the counter is for: XLA's own figure does not grow with the trip count.
    if layers > 1:
        assert got["cost_analysis_flops"] < got["flops"]


def test_batched_dot_and_grad():
    def loss(a, b):  # (4, M, K) x (4, K, N) batched: 2 * 4 * M * K * N forward; grad wrt a adds one more
        return jnp.sum(jnp.einsum("bmk,bkn->bmn", a, b) ** 2)

    compiled = _compiled(jax.grad(loss), (4, M, K), (4, K, N))
    assert hlo_dot_flops(compiled.as_text()) == 2 * (2 * 4 * M * K * N)


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_dot_flops("HloModule empty\n")
