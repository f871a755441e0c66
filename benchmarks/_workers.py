"""One side of the side-by-side benchmark per process, so each side's peak RSS is its own.

    python -m benchmarks._workers {save,jax,torch,quant,peak} '<spec json>'   -> one JSON line on stdout

`benchmarks.run` builds the spec, starts one process to write the checkpoint ("save") and one per side,
and reads the line.
The jax side never imports torch (checked: `torch_imported` in its result), the torch side never
imports jax. Both sides: same checkpoint, same token batches (numpy, seeded), same LoRA (r, alpha,
all-linear, no dropout), AdamW (lr 2e-4, betas 0.9/0.999, eps 1e-8, no weight decay, global-norm
clip 1.0), loss = mean next-token cross-entropy over all positions in float32.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np


def _status(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs), so that the next
    VmHWM reading is the peak of the phase that follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def batches(spec: dict) -> list[np.ndarray]:
    """`steps` distinct (batch, seq) int32 token batches, identical on both sides (seeded numpy)."""
    rng = np.random.default_rng(spec["seed"])
    return [rng.integers(3, spec["vocab"], (spec["batch"], spec["seq"]), dtype=np.int32) for _ in range(spec["steps"])]


def timed_repeats(run_steps, spec: dict) -> tuple[list[float], float, int, int]:
    """(seconds per repeat of `steps` steps, seconds of the first call, peak RSS of the `warmup` (default 2)
    warm-up calls, peak RSS of the timed calls). The warm-up calls (compile, first allocations) are not timed."""
    _reset_peak()
    t0 = time.perf_counter()
    run_steps(1)
    first = time.perf_counter() - t0
    for _ in range(spec.get("warmup", 2) - 1):
        run_steps(1)
    warm_peak = _status("VmHWM")
    _reset_peak()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        run_steps(spec["steps"])
        times.append(time.perf_counter() - t0)
    return times, first, warm_peak, _status("VmHWM")


def _summary(spec, train, gen, loss0) -> dict:
    """train, gen: `timed_repeats` results; gen None when generation is skipped (new_tokens 0): its fields None."""
    tokens = spec["batch"] * spec["seq"] * spec["steps"]
    new = spec["gen_batch"] * spec["new_tokens"]
    train_fields = dict(
        train_tokens_per_s=tokens / statistics.median(train[0]), train_repeat_s=train[0],
        train_first_step_s=train[1], train_peak_rss=max(train[2:]), train_warmup_peak_rss=train[2],
        train_timed_peak_rss=train[3], first_loss=loss0)
    if gen is None:
        return train_fields | dict(gen_tokens_per_s=None, gen_repeat_s=None, gen_first_call_s=None, gen_peak_rss=0)
    return train_fields | dict(gen_tokens_per_s=new / statistics.median(gen[0]), gen_repeat_s=gen[0],
                               gen_first_call_s=gen[1], gen_peak_rss=max(gen[2:]))


def save_side(spec: dict) -> dict:
    """Writes the checkpoint both sides load (`torch_ref.hf_ref`, seeded), in its own process so that
    benchmarks.run never holds a model; how long it took and how large it is."""
    import torch

    from torch_ref import hf_ref

    t0 = time.perf_counter()
    path = hf_ref.save_tiny_model("llama", spec["directory"], seed=spec["seed"],
                                  dtype=getattr(torch, spec["checkpoint_dtype"]), **spec["model"])
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return dict(model_dir=str(path), save_s=time.perf_counter() - t0, checkpoint_bytes=size)


def jax_side(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlora.peft_model import get_peft_model
    from jaxlora.generate import generate
    from jaxlora.lora_config import LoraConfig
    from jaxlora.models.loading import from_pretrained
    from jaxlora.models.quantize import QuantConfig
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.compile_cache import enable_compilation_cache
    from jaxlora.train.step import donating_train_step

    if spec.get("compilation_cache"):  # before the first compile (the loader's); benchmarks.run gives a fresh one
        enable_compilation_cache(spec["compilation_cache"])
    rss_import = _status("VmRSS")
    cd = jnp.dtype(spec["dtype"])
    t0 = time.perf_counter()
    model = from_pretrained(spec["model_dir"], dtype=cd, compute_dtype=cd, remat=spec["remat"],
                            quantization=QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=cd))
    model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules="all-linear"),
                           rngs=nnx.Rngs(0))
    opt_cfg = OptimizerConfig(learning_rate=2e-4, lr_scheduler_type="constant", max_grad_norm=1.0)
    optimizer = nnx.Optimizer(model, make_optimizer(opt_cfg), wrt=nnx.LoRAParam)
    load_s = time.perf_counter() - t0
    rss_loaded, load_peak = _status("VmRSS"), _status("VmHWM")

    data = [{"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32),
             "loss_mask": jnp.ones(ids.shape, bool)} for ids in batches(spec)]
    losses, dispatch = [], []
    step = donating_train_step.bind(model, optimizer)  # as jaxlora.train.loop runs it

    def run_steps(n):
        t0 = time.perf_counter()
        for i in range(n):
            out = step(data[i % len(data)])
        dispatch.append((time.perf_counter() - t0) / n)  # Python time to enqueue a step
        losses.append(float(out["loss"]))  # also waits for the last step: the clock stops on finished work

    train = timed_repeats(run_steps, spec)
    if spec.get("train_only"):  # benchmarks.run's 2nd jaxlora process: the same steps, the compilation cache filled
        tokens = spec["batch"] * spec["seq"] * spec["steps"]
        return dict(train_tokens_per_s=tokens / statistics.median(train[0]), train_repeat_s=train[0],
                    train_first_step_s=train[1], train_peak_rss=max(train[2:]), train_timed_peak_rss=train[3],
                    first_loss=losses[0], load_s=load_s, rss_after_import=rss_import, load_peak_rss=load_peak,
                    gen_peak_rss=0)
    # After the timed steps, so that it perturbs none of them; with the compilation cache on, a cache hit.
    from benchmarks.flops import step_flops

    flops = step_flops(donating_train_step.lower(model, optimizer, data[0]).compile())

    device = jax.devices()[0]
    train_device_peak = (device.memory_stats() or {}).get("peak_bytes_in_use")  # before generation
    compiled = compiled_memory(donating_train_step, model, optimizer, data[0]) if spec.get("memory_analysis") else {}
    prompt = jnp.asarray(batches(spec)[0][: spec["gen_batch"], : spec["prompt_len"]])
    def gen(_n):
        jax.block_until_ready(generate(model, prompt, max_new_tokens=spec["new_tokens"]))

    gen_times = timed_repeats(gen, dict(spec, steps=1)) if spec["new_tokens"] else None
    result = _summary(spec, train, gen_times, losses[0])
    stats = device.memory_stats() or {}
    return result | compiled | dict(
        step_flops=flops["flops"], step_cost_analysis_flops=flops["cost_analysis_flops"],
        train_device_peak_bytes=train_device_peak, use_kernel=kernel_on(model),
        load_s=load_s, rss_after_import=rss_import, rss_after_load=rss_loaded,
        load_peak_rss=load_peak, device_peak_bytes=stats.get("peak_bytes_in_use"),
        train_dispatch_s_per_step=statistics.median(dispatch[spec.get("warmup", 2):]),
        device="gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform,
        backend=f"jax {jax.__version__} on {device.platform} ({device.device_kind})",
        torch_imported="torch" in sys.modules,
    )


def compiled_memory(step, model, optimizer, batch) -> dict:
    """XLA's own account of one train step's device memory (``memory_analysis`` of the compiled step)."""
    m = step.lower(model, optimizer, batch).compile().memory_analysis()
    return {f"compiled_{k}": getattr(m, f"{k}_in_bytes", None)
            for k in ("argument_size", "output_size", "alias_size", "temp_size", "generated_code_size")}


def kernel_on(model) -> bool | None:
    """Whether the model's quantized layers run the fused kernels (None: no quantized layer)."""
    from flax import nnx

    from jaxlora.qlinear import QuantizedLinear

    flags = {m.use_kernel for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)}
    return None if not flags else all(flags)


def torch_side(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    try:  # absent on some GPU images: then PEFT LoRA over the bf16 model, and the result says so
        import bitsandbytes as bnb
    except ImportError as e:
        if spec.get("torch_quant") == "required":
            raise
        bnb, bnb_missing = None, str(e)

    rss_import = _status("VmRSS")
    cuda = torch.cuda.is_available()
    cd = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    quant = None if bnb is None else transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=cd)
    # sdpa: transformers' default and its fastest CPU attention; PyTorch gets its best ordinary setup.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], quantization_config=quant, dtype=cd, attn_implementation="sdpa",
        local_files_only=True, device_map="cuda" if cuda else "cpu")
    for module in model.modules():  # spec bnb-4bit.md "TRAP": the AVX512-BF16 eval path repacks weights
        if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    if spec["remat"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)  # adapters in float32 (PEFT's autocast_adapter_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    load_s = time.perf_counter() - t0
    rss_loaded, load_peak = _status("VmRSS"), _status("VmHWM")
    dev = "cuda" if cuda else "cpu"
    data = [torch.from_numpy(ids).long().to(dev) for ids in batches(spec)]
    losses = []

    def run_steps(n):
        model.train()
        for i in range(n):
            ids = data[i % len(data)]
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())  # .item() synchronises a GPU

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train = timed_repeats(run_steps, spec)
    device_peak = torch.cuda.max_memory_allocated() if cuda else None

    prompt = data[0][: spec["gen_batch"], : spec["prompt_len"]]
    model.eval()
    model.generation_config.eos_token_id = None  # both sides produce exactly new_tokens tokens

    @torch.no_grad()
    def gen(_n):
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=spec["new_tokens"],
                       min_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()

    gen_times = timed_repeats(gen, dict(spec, steps=1)) if spec["new_tokens"] else None
    result = _summary(spec, train, gen_times, losses[0])
    return result | dict(
        quantized=bnb is not None, bnb_missing=None if bnb is not None else bnb_missing,
        load_s=load_s, rss_after_import=rss_import, rss_after_load=rss_loaded,
        load_peak_rss=load_peak, device_peak_bytes=device_peak, device="gpu" if cuda else "cpu",
        backend=(f"torch {torch.__version__} on {dev} ({torch.get_num_threads()} threads, "
                 f"{torch.backends.cpu.get_cpu_capability()}); transformers {transformers.__version__}, "
                 f"peft {peft.__version__}, bitsandbytes {bnb.__version__ if bnb else 'absent'}"),
        jax_imported="jax" in sys.modules,
    )


def quant_side(spec: dict) -> dict:
    """benchmarks.bench_quant's comparison, as rows (name, jaxlora s, bitsandbytes s)."""
    import jax
    import jax.numpy as jnp
    import torch

    import bitsandbytes.functional as F
    from benchmarks.bench_quant import machine, median_time
    from jaxlora.quant import dequantize_4bit, quantize_4bit

    n, repeats = spec["quant_n"], spec["repeats"]
    w = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16) * 0.02
    w_t = torch.from_numpy(np.asarray(w).view(np.uint16).copy()).view(torch.bfloat16)
    rows = []
    for dq_on in (False, True):
        tag = " +double quant" if dq_on else ""
        q = jax.jit(lambda a, c=dq_on: quantize_4bit(a, compress_statistics=c))
        ours = median_time(lambda: jax.block_until_ready(q(w)), repeats)
        theirs = median_time(lambda c=dq_on: F.quantize_4bit(w_t, quant_type="nf4", compress_statistics=c), repeats)
        rows.append((f"quantize nf4{tag}", ours, theirs))
        qt = q(w)
        packed, qs = F.quantize_4bit(w_t, quant_type="nf4", compress_statistics=dq_on)
        dq = jax.jit(dequantize_4bit)
        ours = median_time(lambda: jax.block_until_ready(dq(qt)), repeats)
        theirs = median_time(lambda: F.dequantize_4bit(packed, qs), repeats)
        rows.append((f"dequantize nf4{tag} -> bf16", ours, theirs))
    return {"rows": rows, "machine": machine()}


def peak_side(spec: dict) -> dict:
    """This CPU's one-core f32 matmul rate: the faster of jax (XLA) and torch (oneDNN) on an n^3 product,
    pinned to the first CPU of `cpus` (or of this process's set) and one torch thread: the stated peak
    the train rows' FLOP/s are a fraction of. bf16 rates are recorded beside it."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.timing import median_time

    os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[0]])
    torch.set_num_threads(1)
    n = 2048
    rates = {}
    for dtype in ("float32", "bfloat16"):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        mm = jax.jit(jnp.matmul)
        rates[f"jax_{dtype}"] = 2 * n**3 / median_time(lambda: jax.block_until_ready(mm(a, a)), spec["repeats"] + 2)
        t = torch.randn(n, n, dtype=getattr(torch, dtype))
        rates[f"torch_{dtype}"] = 2 * n**3 / median_time(lambda: torch.mm(t, t), spec["repeats"] + 2)
    detail = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items())
    return dict(peak_flops=max(rates["jax_float32"], rates["torch_float32"]), n=n, rates=rates,
                detail=f"GFLOP/s: {detail}")


SIDES = {"save": save_side, "jax": jax_side, "torch": torch_side, "quant": quant_side, "peak": peak_side}

if __name__ == "__main__":
    side, spec = sys.argv[1], json.loads(sys.argv[2])
    if spec.get("cpus"):  # before any library starts its thread pool: both size theirs to this set
        os.sched_setaffinity(0, spec["cpus"])
    result = SIDES[side](spec)
    if side in ("jax", "torch"):
        result["process_peak_rss"] = max(result[k] for k in ("load_peak_rss", "train_peak_rss", "gen_peak_rss"))
    result["cpus_used"] = sorted(os.sched_getaffinity(0))
    print("@@RESULT " + json.dumps(result))
