"""The jax-side sections of `benchmarks.gpu`, one per process:

    python -m benchmarks._gpu_sections {exactness,bandwidth,bnb_quant} '<spec json>'  -> one @@RESULT line

Each returns a JSON-able dict. They run on whatever device jax has: on a GPU the kernels are compiled
(Triton), on CPU (``--dry-run``) they are interpreted and the figures mean nothing but that the code runs.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from benchmarks.timing import median_time


def _device() -> dict:
    import jax

    d = jax.devices()[0]
    return dict(platform=d.platform, device_kind=d.device_kind, jax=jax.__version__)


def _weight(shape, seed: int, double_quant: bool = True, quant_type: str = "nf4"):
    import jax
    import jax.numpy as jnp

    from jaxlora.quant import QuantConfig, quantize

    w = jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(jnp.bfloat16) * 0.02
    return quantize(w, QuantConfig(blocksize=64, quant_type=quant_type, double_quant=double_quant))


def exactness(spec: dict) -> dict:
    """Kernel vs the jnp path, forward and input gradient: the identity (bit-exact dequantization) and
    random inputs (max error against the float32 reordering bound of tests/kernels/test_matmul_4bit.py)."""
    import jax
    import jax.numpy as jnp

    from jaxlora.kernels import matmul_4bit, matmul_4bit_t
    from jaxlora.qmatmul import dequantize

    rows_out = []
    # Identity: y = W.T exactly (one product per output), so any difference is the dequantization's.
    n_out, n_in = spec["identity_shape"]
    for quant_type, dq in (("nf4", True), ("nf4", False), ("fp4", True)):
        qt = _weight((n_out, n_in), 1, dq, quant_type)
        # The forward dequantizes straight to the compute dtype, the input gradient via the stored dtype
        # (bitsandbytes' two orders, jaxlora.qmatmul).
        dense = np.asarray(dequantize(qt, jnp.float32))
        dense_t = np.asarray(dequantize(qt, qt.dtype).astype(jnp.float32))
        y = jax.jit(lambda x, q: matmul_4bit(x, q, compute_dtype=jnp.float32))(jnp.eye(n_in, dtype=jnp.float32), qt)
        dx = jax.jit(lambda d, q: matmul_4bit_t(d, q, compute_dtype=jnp.float32))(jnp.eye(n_out, dtype=jnp.float32), qt)
        rows_out.append(dict(case=f"identity {quant_type}{' +DQ' if dq else ''} {n_out}x{n_in} fp32",
                             forward_exact=bool(np.array_equal(np.asarray(y), dense.T)),
                             input_grad_exact=bool(np.array_equal(np.asarray(dx), dense_t)),
                             forward_mismatches=int(np.sum(np.asarray(y) != dense.T)),
                             input_grad_mismatches=int(np.sum(np.asarray(dx) != dense_t))))
    for n_out, n_in in spec["shapes"]:
        qt = _weight((n_out, n_in), 2)
        for rows in spec["rows"]:
            for cd in (jnp.bfloat16, jnp.float32):
                x = jax.random.normal(jax.random.key(rows), (rows, n_in), jnp.float32).astype(cd)
                dy = jax.random.normal(jax.random.key(rows + 1), (rows, n_out), jnp.float32).astype(cd)
                # bitsandbytes' orders (jaxlora.qmatmul): the forward dequantizes straight to the compute
                # dtype, the input gradient rounds to the stored dtype first.
                w = dequantize(qt, cd)
                w_t = dequantize(qt, qt.dtype).astype(cd)
                ref_y = jnp.matmul(x, w.T, preferred_element_type=jnp.float32)
                ref_dx = jnp.matmul(dy, w_t, preferred_element_type=jnp.float32).astype(cd)
                y = jax.jit(lambda a, q, c=cd: matmul_4bit(a, q, compute_dtype=c, out_dtype=jnp.float32))(x, qt)
                dx = jax.jit(lambda a, q, c=cd: matmul_4bit_t(a, q, compute_dtype=c))(dy, qt)
                row = dict(case=f"random {n_out}x{n_in} rows {rows} {jnp.dtype(cd).name}")
                for name, got, want, a, b in (("forward", y, ref_y, x, w), ("input_grad", dx, ref_dx, dy, w_t.T)):
                    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
                    bound = _bound(np.asarray(a, np.float64), np.asarray(b, np.float64), cd, rounded=name != "forward")
                    err = np.abs(got - want)
                    row[f"{name}_max_abs_err"] = float(err.max())
                    row[f"{name}_max_err_over_bound"] = float((err / bound).max())
                rows_out.append(row)
    ok = all(r.get("forward_exact", True) and r.get("input_grad_exact", True) for r in rows_out) and all(
        r.get(f"{n}_max_err_over_bound", 0.0) <= 1.0 for r in rows_out for n in ("forward", "input_grad"))
    return dict(rows=rows_out, all_within_bounds=ok, device=_device())


def _bound(a: np.ndarray, b: np.ndarray, cd, *, rounded: bool) -> np.ndarray:
    """|kernel - jnp| bound for a @ b.T: float32 sums of K terms in another order (2K·2⁻²³·Σ|ab|), plus
    one ulp of the compute dtype when both results are rounded to it (tests/kernels/test_matmul_4bit.py)."""
    import jax.numpy as jnp

    mag = np.abs(a) @ np.abs(b).T
    tol = 2 * a.shape[-1] * 2.0**-23 * mag
    if rounded and jnp.dtype(cd) != jnp.float32:
        tol = tol + float(jnp.finfo(cd).eps) * (np.abs(a @ b.T) + tol)
    return np.maximum(tol, np.finfo(np.float32).tiny)


def bandwidth(spec: dict) -> dict:
    """GB/s of the fused forward at decode shapes (bytes read and written / time), beside the jnp path
    (dequantize, then matmul) and a device-to-device copy. `unroll` distinct inputs per jitted call
    amortise the dispatch (a 4096² decode matmul is a few µs on an H200, less than one dispatch)."""
    import jax
    import jax.numpy as jnp

    from jaxlora.kernels import matmul_4bit
    from jaxlora.qmatmul import dequantize

    k, repeats = spec["unroll"], spec["repeats"]
    n = spec["copy_bytes"]
    buf = jnp.zeros((n,), jnp.uint8)
    copy = jax.jit(lambda a, v: a ^ v)  # reads and writes every byte; a traced value XLA cannot fold
    copy_s = median_time(lambda: copy(buf, jnp.uint8(1)).block_until_ready(), repeats)
    copy_gbs = 2 * n / copy_s / 1e9
    del buf
    rows = []
    for n_out, n_in in spec["shapes"]:
        qt = _weight((n_out, n_in), 3)
        weight_bytes = sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(qt))
        for batch in spec["batches"]:
            xs = jax.random.normal(jax.random.key(batch), (k, batch, n_in), jnp.float32).astype(jnp.bfloat16)
            io = batch * (n_in + n_out) * 2  # x read and y written, bf16
            sweep = batch in spec["sweep_batches"] and f"{n_out}x{n_in}" in spec["sweep_shapes"]
            for label, tiles in [("kernel", {})] + [(f"kernel bn{bn} bk{bk}", dict(block_n=bn, block_k=bk))
                                                   for bn, bk in spec["tile_sweep"] if sweep]:
                try:
                    fn = jax.jit(lambda xs, q, t=tiles: jnp.stack([matmul_4bit(xs[i], q, **t) for i in range(k)]))
                    s = median_time(lambda: fn(xs, qt).block_until_ready(), repeats) / k
                    rows.append(dict(shape=f"{n_out}x{n_in}", batch=batch, path=label, us=s * 1e6,
                                     gb_s=(weight_bytes + io) / s / 1e9))
                except Exception as e:  # an unsupported tile: recorded, the sweep goes on
                    rows.append(dict(shape=f"{n_out}x{n_in}", batch=batch, path=label, error=repr(e)[:300]))
            if batch not in spec["jnp_batches"]:
                continue
            ref = jax.jit(lambda xs, q: jnp.stack([
                jnp.matmul(xs[i], dequantize(q, q.dtype).T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
                for i in range(k)]))
            s = median_time(lambda: ref(xs, qt).block_until_ready(), repeats) / k
            rows.append(dict(shape=f"{n_out}x{n_in}", batch=batch, path="jnp (dequantize + matmul)", us=s * 1e6,
                             gb_s=(weight_bytes + io) / s / 1e9))
    for r in rows:
        if "gb_s" in r:
            r["fraction_of_copy"] = r["gb_s"] / copy_gbs
    return dict(copy_gb_s=copy_gbs, copy_bytes=n, rows=rows, device=_device())


def bnb_quant(spec: dict) -> dict:
    """bitsandbytes' quantize_4bit on its device (CUDA on a GPU) vs jaxlora's `bnb_backend` default
    for this platform, field by field; skipped when bitsandbytes is absent."""
    try:
        import bitsandbytes.functional as F
        import torch
    except ImportError as e:
        return dict(skipped=f"bitsandbytes is not installed ({e}); CUDA bytes unverified")
    import jax.numpy as jnp

    from jaxlora import platform
    from jaxlora.quant import quantize_4bit  # bitsandbytes' functional API, mirrored, against itself

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    backend = platform.defaults().bnb_backend
    rows = []
    for shape, quant_type, dq in spec["cases"]:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        if quant_type == "nf4":
            w.view(-1)[:64] = 0  # an all-zero block: one of the places the backends differ
        packed, state = F.quantize_4bit(w.to(dev), quant_type=quant_type, compress_statistics=dq)
        theirs = {"codes": packed.cpu().numpy().reshape(-1)}
        if dq:
            theirs |= {"absmax": state.absmax.cpu().numpy(), "nested_absmax": state.state2.absmax.cpu().numpy(),
                       "offset": np.asarray(state.offset.cpu().numpy())}
        else:
            theirs |= {"absmax": state.absmax.float().cpu().numpy()}
        del packed, state
        if dev == "cuda":
            torch.cuda.empty_cache()
        w_j = jnp.asarray(w.view(torch.int16).numpy()).view(jnp.bfloat16)
        qt = quantize_4bit(w_j, blocksize=64, quant_type=quant_type, compress_statistics=dq, bnb_backend=backend)
        ours = {"codes": np.asarray(qt.codes).reshape(-1), "absmax": np.asarray(qt.absmax)}
        if dq:
            ours |= {"nested_absmax": np.asarray(qt.nested_absmax), "offset": np.asarray(qt.offset)}
        row = dict(case=f"{quant_type}{' +DQ' if dq else ''} {shape[0]}x{shape[1]}", bnb_device=dev,
                   jaxlora_bnb_backend=backend)
        for key, a in theirs.items():
            a = np.atleast_1d(a)
            b = np.atleast_1d(ours[key])
            b = b.reshape(a.shape) if b.size == a.size else b
            row[f"{key}_identical"] = bool(a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8)))
            if a.shape == b.shape and a.size:
                row[f"{key}_differing"] = int(np.sum(a.view(np.uint8) != b.view(np.uint8)))
        rows.append(row)
    return dict(rows=rows, bitsandbytes=getattr(sys.modules.get("bitsandbytes"), "__version__", "?"),
                device=_device())


SECTIONS = {"exactness": exactness, "bandwidth": bandwidth, "bnb_quant": bnb_quant}

if __name__ == "__main__":
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    print("@@RESULT " + json.dumps(SECTIONS[name](spec)), flush=True)
