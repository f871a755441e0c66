"""`jaxlora train | eval | generate | export`: QLoRA fine-tuning from the command line.

    jaxlora train --model ./my-llama --data train.jsonl --output-dir runs/x --max-steps 200
    jaxlora train --config run.yaml --lora.r 16 --optim.learning_rate 1e-4
    jaxlora train --config run.yaml --resume            # continue from runs/x's newest checkpoint
    jaxlora eval --model ./my-llama --adapter runs/x/adapter --data eval.jsonl [--accuracy]
    jaxlora generate --model ./my-llama --adapter runs/x/adapter --prompt "12+30="
    jaxlora export --model ./my-llama --adapter runs/x/adapter --merged out/merged-model

A config file (YAML or JSON) maps sections onto frozen dataclasses: `model` (ModelConfig),
`quantization` (QuantConfig), `lora` (LoraConfig), `data` (DataConfig), `optim` (OptimizerConfig),
`train` (TrainConfig). Flags `--section.field value` override it; unknown keys are errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import config_io
from jaxlora.lora_config import LoraConfig
from jaxlora.models.quantize import QuantConfig
from jaxlora.train.data import DataConfig
from jaxlora.train.lock import RunLockedError
from jaxlora.train.loop import NonFiniteLossError, TrainConfig
from jaxlora.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str  # a local Hugging Face model directory, or a hub id (needs a network)
    tokenizer: str | None = None  # default: the model directory; "byte" for the built-in byte tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage of the unquantized params
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # activations; default dtype
    quantize: bool = True  # QLoRA: quantize the linear layers while loading (the `quantization` section)
    remat: bool = False  # recompute each block's activations in the backward pass (less memory)
    seed: int = 0  # adapter initialisation and dropout


SECTIONS = {
    "model": ModelConfig,
    "quantization": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "optim": OptimizerConfig,
    "train": TrainConfig,
}
# Short flags for the knobs used most, each the same as its --section.field.
ALIASES = {
    "model": "model.name_or_path",
    "data": "data.path",
    "output_dir": "train.output_dir",
    "max_steps": "optim.max_steps",
    "eval_every": "train.eval_every",
    "save_every": "train.save_every",
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    quantization: QuantConfig
    lora: LoraConfig
    data: DataConfig
    optim: OptimizerConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, np.dtype):
                return v.name
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, dict) or hasattr(v, "items"):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {name: {f.name: plain(getattr(getattr(self, name), f.name)) for f in dataclasses.fields(cls)}
                for name, cls in SECTIONS.items()}


def resolve_config(file_cfg: dict, overrides: dict[str, dict]) -> RunConfig:
    merged = config_io.merge_sections(file_cfg, overrides, SECTIONS)
    q = merged["quantization"]
    if isinstance(q.get("compute_dtype"), str):  # a dtype name from YAML or a flag
        q["compute_dtype"] = jnp.dtype(q["compute_dtype"])
    return RunConfig(**{name: config_io.build(cls, merged[name], where=name) for name, cls in SECTIONS.items()})


def load_model(cfg: ModelConfig, quant: QuantConfig | None):
    from jaxlora.models.loading import from_pretrained

    return from_pretrained(
        cfg.name_or_path,
        dtype=jnp.dtype(cfg.dtype),
        compute_dtype=None if cfg.compute_dtype is None else jnp.dtype(cfg.compute_dtype),
        remat=cfg.remat,
        quantization=quant if cfg.quantize else None,
    )


def _tokenizer(cfg: ModelConfig):
    from jaxlora.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer or cfg.name_or_path)


def cmd_train(args: argparse.Namespace) -> dict:
    from jaxlora.train.distributed import initialize_from_env
    from jaxlora.train.loop import run_lock

    initialize_from_env()  # several processes: JAXLORA_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
    file_cfg = config_io.read_config_file(args.config) if args.config else {}
    cfg = resolve_config(file_cfg, _overrides(args))
    with run_lock(cfg.train.output_dir):  # one run per output_dir, refused before anything is written
        return _train(args, cfg)


def _train(args: argparse.Namespace, cfg: RunConfig) -> dict:
    from jaxlora.adapters import get_peft_model, print_trainable_parameters
    from jaxlora.peft_io import save_adapter
    from jaxlora.train.data import load_data
    from jaxlora.train.distributed import host_local, is_primary
    from jaxlora.train.loop import check_output_dir, train

    out = Path(cfg.train.output_dir)
    check_output_dir(out, resume=args.resume)  # before the (slow) model load
    tok = _tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.quantization)
    limit = model.config.max_position_embeddings
    if cfg.data.max_seq_len > limit:
        raise ValueError(f"data.max_seq_len={cfg.data.max_seq_len} exceeds the model's max_position_embeddings={limit}")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    get_peft_model(model, cfg.lora, rngs=nnx.Rngs(params=cfg.model.seed, dropout=cfg.model.seed + 1))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result alone
        trainable, total = print_trainable_parameters(model)
    data = load_data(cfg.data, tok)
    print(f"data: {len(data.train)} train / {len(data.eval)} eval examples ({data.dropped} dropped)", file=sys.stderr)
    if is_primary():
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def write_adapter(m, path):  # with the tokenizer, so `eval` / `generate --adapter` take the directory alone
        save_adapter(m, path)
        tok.save(str(path))

    summary = train(
        model, data, data_cfg=cfg.data, optim_cfg=cfg.optim, train_cfg=cfg.train,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        write_adapter=write_adapter, resume=args.resume, run_info=cfg.to_dict(),
    )
    with host_local(model):  # adapters sharded across processes are gathered for the writer
        if is_primary():
            write_adapter(model, out / "adapter")
    return {**summary, "adapter": str(out / "adapter"), "trainable_params": trainable, "all_params": total}


def _model_with_adapter(args):
    from jaxlora.peft_io import load_adapter

    mcfg = ModelConfig(name_or_path=args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantize=args.quantize)
    model = load_model(mcfg, QuantConfig(compute_dtype=jnp.dtype(args.dtype)) if args.quantize else None)
    if args.adapter:
        load_adapter(model, args.adapter, rngs=nnx.Rngs(0))
    tok = _tokenizer(mcfg if args.tokenizer or not args.adapter else dataclasses.replace(mcfg, tokenizer=args.adapter))
    return model, tok


def cmd_eval(args) -> dict:
    from jaxlora.evaluate import completion_accuracy
    from jaxlora.train.data import load_data
    from jaxlora.train.loop import evaluate
    from jaxlora.train.records import read_jsonl

    model, tok = _model_with_adapter(args)
    dcfg = DataConfig(path=args.data, max_seq_len=args.max_seq_len, batch_size=args.batch_size, overlong="truncate")
    data = load_data(dcfg, tok)
    loss = evaluate(model, data.train, dcfg, pad_token_id=tok.pad_token_id or 0)
    result = {"eval_loss": loss, "perplexity": float(np.exp(loss)), "examples": len(data.train)}
    if args.accuracy:
        records = [r for _, r in read_jsonl(args.data)]
        if not all("prompt" in r for r in records):
            raise ValueError(f"--accuracy needs prompt/completion records; {args.data} has other records")
        result["accuracy"], _ = completion_accuracy(model, tok, records)
    return result


def cmd_generate(args) -> dict:
    import jax

    from jaxlora.evaluate import encode_prompt
    from jaxlora.generate import generate

    model, tok = _model_with_adapter(args)
    ids = jnp.asarray([encode_prompt(tok, args.prompt)], jnp.int32)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   rng=jax.random.key(args.seed), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = [int(t) for t in np.asarray(out[0, ids.shape[1]:])]
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return {"prompt": args.prompt, "completion": tok.decode(new)}


def cmd_export(args) -> dict:
    from jaxlora.adapters import merge_and_unload
    from jaxlora.models.loading import save_pretrained

    if not args.adapter:
        raise ValueError("export needs --adapter (the PEFT adapter directory to merge)")
    args.quantize = False  # merge into the full-precision base: no quantization error added
    model, tok = _model_with_adapter(args)
    merge_and_unload(model)
    path = save_pretrained(model, args.merged)
    tok.save(str(path))
    return {"merged": str(path)}


def _overrides(args) -> dict[str, dict]:
    for alias, target in ALIASES.items():
        value = getattr(args, alias, None)
        if value is not None:
            setattr(args, target, str(value))
    return config_io.flag_overrides(args, SECTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="QLoRA / LoRA fine-tuning", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--config", help="YAML or JSON file with the sections below")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    for alias, target in ALIASES.items():
        tr.add_argument(f"--{alias.replace('_', '-')}", dest=alias, help=f"= --{target}")
    for name, cls in SECTIONS.items():
        config_io.add_flags(tr, name, cls)
    for name, fn in (("eval", cmd_eval), ("generate", cmd_generate), ("export", cmd_export)):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="base model directory (or hub id)")
        p.add_argument("--adapter", help="PEFT adapter directory (e.g. runs/x/adapter)")
        p.add_argument("--tokenizer", help="tokenizer path or 'byte' (default: the adapter's, else the model's)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--no-quantize", dest="quantize", action="store_false", help="keep the base dense")
        p.set_defaults(fn=fn)
    ev, gen, exp = (sub.choices[n] for n in ("eval", "generate", "export"))
    ev.add_argument("--data", required=True)
    ev.add_argument("--max-seq-len", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--accuracy", action="store_true", help="exact-match accuracy of greedy completions")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    exp.add_argument("--merged", required=True, help="output directory for the merged HF checkpoint")
    tr.set_defaults(fn=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except (ValueError, FileNotFoundError, RunLockedError, NonFiniteLossError) as e:
        print(f"jaxlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
