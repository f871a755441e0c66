"""The GPU program, lowered for CUDA on this CPU-only machine: a lowering error on the GPU path fails here.

JAX lowers for a platform it does not have (``.lower(lowering_platforms=("cuda",))``), and Pallas'
Triton lowering runs during that lowering, so each fused kernel arrives as a
``__gpu$xla.gpu.triton`` custom call carrying its Triton IR, grid and launch parameters. What this
cannot check is Triton's own compilation of that IR to PTX and the kernel running: those need a GPU
(``python -m benchmarks.gpu``). Everything is abstract (``jax.ShapeDtypeStruct``, ``nnx.eval_shape``),
so 7B-shaped layers cost no memory and no quantization time.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora import platform
from jaxlora.kernels import matmul_4bit, matmul_4bit_t, tiling
from jaxlora.models.stack import unstacked
from jaxlora.quant import QuantConfig, quantize
from jaxlora.train.step import train_step

GPU = platform.defaults_for("gpu")
TRITON = "__gpu$xla.gpu.triton"
_CALL = re.compile(r"stablehlo\.custom_call @__gpu\$xla\.gpu\.triton\(.*")


def _triton_calls(text: str) -> list[dict]:
    """Each Triton custom call of a lowered module: kernel name, grid, launch settings, IR size, and
    whether its IR holds the PTX ``mul.rn.f32`` that keeps double quantization's two roundings."""
    calls = []
    for line in _CALL.findall(text):
        ir = re.search(r'ir = "((?:[^"\\]|\\.)*)"', line).group(1)
        meta = dict(re.findall(r"(\w+) = (\d+) : i32", line.replace(ir, "")))
        calls.append(dict(name=re.search(r'name = "(\w+)"', line.replace(ir, "")).group(1),
                          grid=(int(meta["grid_x"]), int(meta["grid_y"]), int(meta["grid_z"])),
                          num_warps=int(meta["num_warps"]), num_stages=int(meta["num_stages"]),
                          ir_bytes=len(ir), two_roundings="mul.rn.f32" in ir))
    return calls


def _lower_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _abstract_weight(shape, *, quant_type="nf4", double_quant=True, dtype=jnp.bfloat16):
    config = QuantConfig(blocksize=64, quant_type=quant_type, double_quant=double_quant)
    return jax.eval_shape(lambda w: quantize(w, config), jax.ShapeDtypeStruct(shape, dtype))


# --- the kernels, at the tiles the library picks ----------------------------------------------------

# Llama-2-7B's linear shapes (out, in): q/k/v/o, gate/up, down. Rows: decode (1, 16: batch x 1 token,
# the memory-bound tiles), just past decode (17), and prefill / training (512, 4096 = batch x seq).
SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
ROWS = [1, 16, 17, 512, 4096]
FORMATS = [  # (quant_type, double_quant, compute dtype): QLoRA's recipe first, then the others
    ("nf4", True, jnp.bfloat16), ("nf4", False, jnp.bfloat16), ("fp4", True, jnp.bfloat16),
    ("nf4", True, jnp.float16), ("nf4", True, jnp.float32),
]
CASES = ([(shape, rows, FORMATS[0]) for shape in SHAPES_7B for rows in ROWS]
         + [((4096, 4096), rows, fmt) for fmt in FORMATS[1:] for rows in (16, 512)])


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "input_grad"])
@pytest.mark.parametrize(("shape", "rows", "fmt"), CASES,
                         ids=[f"{s[0]}x{s[1]}-rows{r}-{f[0]}{'dq' if f[1] else ''}-{np.dtype(f[2]).name}"
                              for s, r, f in CASES])
def test_kernel_lowers_to_triton_with_the_chosen_tiles(shape, rows, fmt, transpose):
    quant_type, double_quant, cd = fmt
    qt = _abstract_weight(shape, quant_type=quant_type, double_quant=double_quant)
    n_out, n_in = shape
    operand = jax.ShapeDtypeStruct((rows, n_out if transpose else n_in), cd)
    fn = matmul_4bit_t if transpose else matmul_4bit
    calls = _triton_calls(_lower_cuda(lambda a, q: fn(a, q, compute_dtype=cd), operand, qt))

    assert len(calls) == 1, calls
    (call,) = calls
    t = tiling.choose(qt, n_in, rows=rows)
    row_tiles = -(-rows // t.block_m)
    col_tiles = n_in // t.block_k if transpose else n_out // t.block_n
    assert call["name"] == ("_bwd_kernel" if transpose else "_fwd_kernel")
    assert call["grid"] == (row_tiles, col_tiles, 1)
    assert (call["num_warps"], call["num_stages"]) == (4, 3)
    assert call["two_roundings"] == double_quant  # the nested absmax is computed in the kernel


def test_interpret_is_chosen_per_lowering_platform() -> None:
    # The same traced function: Triton when lowered for CUDA, the interpreter (no custom call) for CPU.
    qt = _abstract_weight((256, 512))
    x = jax.ShapeDtypeStruct((4, 512), jnp.bfloat16)
    traced = jax.jit(lambda a, q: matmul_4bit(a, q)).trace(x, qt)
    assert TRITON in traced.lower(lowering_platforms=("cuda",)).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "custom_call" not in cpu and "while" in cpu  # the interpreter's loop over the grid


# --- the whole QLoRA train step and generate, with the GPU defaults --------------------------------

# Dimensions divisible by every tile the library picks, so each quantized linear runs in the kernels.
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
N_LINEARS = 7  # q, k, v, o, gate, up, down per layer: all quantized (lm_head stays dense)


def _abstract_qlora(defaults: platform.PlatformDefaults, **config):
    """A quantized Llama with LoRA on all linears and its AdamW optimizer, as shapes only."""

    def build():
        model = jaxlora.LlamaForCausalLM(jaxlora.LlamaConfig(**(TINY | config)), dtype=defaults.compute_dtype,
                                         param_dtype=defaults.compute_dtype, rngs=nnx.Rngs(0))
        jaxlora.quantize_model(model, jaxlora.QuantConfig(compute_dtype=defaults.compute_dtype,
                                                          use_kernel=defaults.use_kernel,
                                                          bnb_backend=defaults.bnb_backend))
        model = jaxlora.get_peft_model(model, jaxlora.LoraConfig(r=16, lora_alpha=32), rngs=nnx.Rngs(1))
        return model, nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)

    return nnx.eval_shape(build)


def _batch(batch: int, seq: int) -> dict:
    return {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_)}


def _lower_train_step(defaults, batch: dict, **config) -> str:
    graphdef, state = nnx.split(_abstract_qlora(defaults, **config))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(model, optimizer, batch)
        return metrics, nnx.state((model, optimizer))  # the update is an output: nothing is dead code

    return _lower_cuda(step, state, batch)


def test_gpu_defaults_turn_the_kernels_on_and_quantize_with_cuda_bytes() -> None:
    model, _ = _abstract_qlora(GPU)
    with unstacked(model):  # per layer: the decoder layers are stacked
        layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, jaxlora.QuantizedLinear)]
    assert len(layers) == N_LINEARS * TINY["num_hidden_layers"]
    assert all(m.use_kernel and m.compute_dtype == jnp.bfloat16 for m in layers)
    assert (GPU.compute_dtype, GPU.attention_impl, GPU.bnb_backend) == (jnp.bfloat16, "cudnn", "cuda")


def _linear_shapes(config: dict) -> set[tuple[int, int]]:
    """(out, in) of a decoder layer's linears: q, k / v, o, gate / up, down."""
    h, i = config["hidden_size"], config["intermediate_size"]
    head = h // config["num_attention_heads"]
    return {(h, h), (config["num_key_value_heads"] * head, h), (i, h), (h, i)}


def _grids(calls: list[dict], name: str) -> set[tuple[int, ...]]:
    return {c["grid"] for c in calls if c["name"] == name}


def _expected_grids(shapes, rows: int, transpose: bool) -> set[tuple[int, ...]]:
    """The launch grid `tiling.choose` gives each (out, in) shape: (row tiles, column tiles, 1)."""
    grids = set()
    for n_out, n_in in shapes:
        t = tiling.choose(_abstract_weight((n_out, n_in)), n_in, rows=rows)
        grids.add((-(-rows // t.block_m), n_in // t.block_k if transpose else n_out // t.block_n, 1))
    return grids


def test_qlora_train_step_lowers_for_cuda_with_the_kernels() -> None:
    calls = _triton_calls(_lower_train_step(GPU, _batch(2, 64)))
    assert {c["name"] for c in calls} == {"_fwd_kernel", "_bwd_kernel"}
    # Every linear shape's forward and input gradient is a kernel launch with the tiles the library
    # picks. (Grids, not call counts: identical calls may lower once, and a scanned decoder lowers
    # one layer's body.)
    shapes = _linear_shapes(TINY)
    assert _grids(calls, "_fwd_kernel") == _expected_grids(shapes, 2 * 64, transpose=False)
    assert _grids(calls, "_bwd_kernel") == _expected_grids(shapes, 2 * 64, transpose=True)
    assert all(c["two_roundings"] for c in calls)  # NF4 + double quantization, QLoRA's recipe


def test_kernels_off_lowers_without_triton() -> None:
    # The control for the test above: the same step with use_kernel off has no Triton call, so the
    # calls above are the kernels' and not something else of the GPU program.
    text = _lower_train_step(platform.defaults_for("gpu", use_kernel=False), _batch(2, 64))
    assert TRITON not in text


def test_train_step_at_7b_layer_shapes_lowers_for_cuda() -> None:
    # One 7B-shaped decoder layer (hidden 4096, SwiGLU 11008, 32 heads): the prefill tiles at real shapes.
    config = dict(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                  num_attention_heads=32, num_key_value_heads=32)
    calls = _triton_calls(_lower_train_step(GPU, _batch(1, 256), **config))
    shapes = _linear_shapes(config)
    assert _grids(calls, "_fwd_kernel") == _expected_grids(shapes, 256, transpose=False)
    assert _grids(calls, "_bwd_kernel") == _expected_grids(shapes, 256, transpose=True)


def test_generate_lowers_for_cuda_with_the_kernels() -> None:
    model, _ = _abstract_qlora(GPU)
    graphdef, state = nnx.split(model)

    def gen(state, ids, mask):
        return jaxlora.generate(nnx.merge(graphdef, state), ids, attention_mask=mask, max_new_tokens=8)

    ids = jax.ShapeDtypeStruct((4, 32), jnp.int32)
    calls = _triton_calls(_lower_cuda(gen, state, ids, ids))
    assert {c["name"] for c in calls} == {"_fwd_kernel"}  # no gradient in generation
    # Prefill (4 x 32 rows) and each decode step (4 rows) pick their own tiles.
    shapes = _linear_shapes(TINY)
    assert _grids(calls, "_fwd_kernel") == (_expected_grids(shapes, 4 * 32, transpose=False)
                                            | _expected_grids(shapes, 4, transpose=False))


def test_cudnn_attention_lowers_where_cudnn_is_present() -> None:
    # GPU.attention_impl: cuDNN's fused attention checks for cuDNN while it traces, so without one it
    # cannot even be lowered. On a GPU machine this runs; here it is skipped, and says so.
    q = jax.ShapeDtypeStruct((2, 128, 8, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)

    def attend(q, k, v, lengths):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                            implementation=GPU.attention_impl)

    try:
        text = _lower_cuda(attend, q, k, k, lengths)
    except RuntimeError as e:
        if "cuDNN is not detected" in str(e):
            pytest.skip("cuDNN is not installed: its attention cannot be lowered on this machine")
        raise
    assert "cudnn" in text.lower()


@pytest.mark.parametrize("remat", ["full", "offload"])
def test_scanned_remat_blockwise_train_step_lowers_for_cuda(remat) -> None:
    """The GPU training path of the real model as it runs at length: scanned layers, remat_scan keeping the
    layer boundaries (on the device, or offloaded to pinned host memory), blockwise attention past one
    512-key block, the chunked loss and the Pallas kernels."""
    from jaxlora.plan import abstract_qlora, lowered_step

    config = jaxlora.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model, optimizer = abstract_qlora(config, remat=remat, quantization=jaxlora.QuantConfig(use_kernel=True))
    lowered, _ = lowered_step(model, optimizer, seq=1024, platform="cuda")
    text = lowered.as_text()
    assert "triton" in text  # the Pallas kernels, compiled for the GPU
    assert ("pinned_host" in text) == (remat == "offload")  # the saved boundaries' memory kind
