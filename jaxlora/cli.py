"""`jaxlora train | eval | generate | export`: QLoRA fine-tuning from the command line.

    jaxlora train --model ./my-llama --data train.jsonl --data.max_seq_len 512 --data.batch_size 8 \
        --output-dir runs/x --max-steps 200
    jaxlora train --config run.yaml --lora.r 16 --optim.learning_rate 1e-4
    jaxlora train --config run.yaml --resume            # continue from runs/x's newest checkpoint
    jaxlora eval --model ./my-llama --adapter runs/x/adapter --data eval.jsonl [--accuracy]
    jaxlora generate --model ./my-llama --adapter runs/x/adapter --prompt "12+30="
    jaxlora export --model ./my-llama --adapter runs/x/adapter --merged out/merged-model

A config file (YAML or JSON) maps sections onto frozen dataclasses: `model` (ModelConfig),
`quantization` (QuantConfig), `lora` (LoraConfig), `data` (DataConfig), `optim` (OptimizerConfig),
`train` (TrainConfig). Flags `--section.field value` override it; unknown keys are errors. A user error (a bad value, a missing
file, a model and tokenizer that do not fit) ends in one line naming it and exit code 2; `--debug` shows
the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import config_io
from jaxlora.checks import number
from jaxlora.lora_config import LoraConfig
from jaxlora.models.quantize import QuantConfig
from jaxlora.train.data import DataConfig
from jaxlora.train.lock import RunLockedError
from jaxlora.train.loop import TrainConfig
from jaxlora.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str  # a local Hugging Face model directory, or a hub id (needs a network)
    tokenizer: str | None = None  # a directory or hub id (unset: the model's); "byte": the built-in byte tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage of the unquantized params
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # of activations (unset: dtype)
    quantize: bool = True  # QLoRA: quantize the linear layers while loading (the `quantization` section)
    # gradient checkpointing per decoder layer: "full" keeps only layer inputs (QLoRA's recipe), "offload"
    # keeps them in host memory, "nested" every ~sqrt(layers)-th one (least memory, one more forward), "dots"
    # also the matmul outputs, "none" everything (fastest); true = "full"
    remat: Literal["none", "full", "dots", "offload", "nested"] | bool = "full"
    attention: Literal["auto", "eager", "blockwise", "cudnn"] = "auto"  # auto: blockwise past 512 keys
    seed: int = 0  # adapter initialisation and dropout

    def __post_init__(self):
        number("seed", self.seed, integer=True, ge=0)


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
    "report_to": "train.report_to",
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
        try:
            q["compute_dtype"] = jnp.dtype(q["compute_dtype"])
        except TypeError:
            raise ValueError(f"quantization.compute_dtype={q['compute_dtype']!r} is not one of "
                             f"{list(DTYPES)}") from None
    return RunConfig(**{name: config_io.build(cls, merged[name], where=name) for name, cls in SECTIONS.items()})


DTYPES = ("float32", "bfloat16", "float16")
EVAL_MAX_SEQ_LEN = 512  # eval's default --max-seq-len, when the model takes that many positions


def model_config(name_or_path: str):
    """(local checkpoint directory, its LlamaConfig): read before the (slow) weights, to check inputs first."""
    from jaxlora.models.hf_files import load_config, resolve

    directory = resolve(name_or_path, None)
    return directory, load_config(directory)


def load_model(directory, cfg: ModelConfig, quant: QuantConfig | None):
    from jaxlora.models.loading import from_pretrained

    return from_pretrained(
        directory,
        dtype=jnp.dtype(cfg.dtype),
        compute_dtype=None if cfg.compute_dtype is None else jnp.dtype(cfg.compute_dtype),
        remat=cfg.remat, attention=cfg.attention,
        quantization=quant if cfg.quantize else None,
    )


def load_tokenizer(source: str, flag: str):
    from jaxlora.tokenizer import load_tokenizer as load

    try:
        return load(source)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (with {flag})") from None


def check_fit(config, directory, tok, tok_source: str, *, max_seq_len: int | None = None, flag: str = "") -> None:
    """Refuse a tokenizer or a sequence length the model cannot take, before anything slow runs.

    Token ids at or past the model's vocab_size have no embedding (jax's gather then gives NaN);
    the byte tokenizer cannot decode the ids a model with a larger vocabulary may emit.
    """
    from jaxlora.tokenizer import ByteTokenizer

    vocab = config.vocab_size
    if tok.vocab_size > vocab:
        raise ValueError(f"tokenizer {tok_source!r} has {tok.vocab_size} ids but the model {directory} embeds only "
                         f"{vocab} (vocab_size in its config.json): pass the model's own tokenizer")
    if isinstance(tok, ByteTokenizer) and vocab != tok.vocab_size:
        raise ValueError(f"the byte tokenizer has {tok.vocab_size} ids but the model {directory} has vocab_size "
                         f"{vocab}: the ids it may generate past {tok.vocab_size - 1} decode to nothing; use a model "
                         f"built with vocab_size={tok.vocab_size}, or the model's own tokenizer")
    limit = config.max_position_embeddings
    if max_seq_len is not None and max_seq_len > limit:
        raise ValueError(f"{flag}={max_seq_len} exceeds the model's max_position_embeddings={limit} ({directory})")


def cmd_train(args: argparse.Namespace) -> dict:
    from jaxlora.fileio import check_directory_path
    from jaxlora.train.distributed import initialize_from_env
    from jaxlora.train.loop import run_lock

    initialize_from_env()  # several processes: JAXLORA_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
    file_cfg = config_io.read_config_file(args.config) if args.config else {}
    cfg = resolve_config(file_cfg, _overrides(args))
    check_directory_path(cfg.train.output_dir, "train.output_dir")  # a file there: refused before the lock
    with run_lock(cfg.train.output_dir):  # one run per output_dir, refused before anything is written
        return _train(args, cfg)


def _train(args: argparse.Namespace, cfg: RunConfig) -> dict:
    from jaxlora.peft_model import get_peft_model, print_trainable_parameters
    from jaxlora.peft_model import save_adapter
    from jaxlora.train.checkpoint import latest_checkpoint
    from jaxlora.train.data import load_data
    from jaxlora.train.distributed import host_local, is_primary
    from jaxlora.train.loop import check_output_dir, train

    out = Path(cfg.train.output_dir)
    check_output_dir(out, resume=args.resume)  # before the (slow) model load
    if args.resume:
        ckpt = latest_checkpoint(out)
        done = int(ckpt.name.split("-")[1])
        if done >= cfg.optim.max_steps:
            print(f"{out} already finished: its newest checkpoint is step {done} of max_steps="
                  f"{cfg.optim.max_steps}; nothing to resume (raise --optim.max_steps to train further)",
                  file=sys.stderr)
            return {"finished": True, "step": done, "checkpoint": str(ckpt), "adapter": str(out / "adapter")}
    source = cfg.model.tokenizer or cfg.model.name_or_path
    tok = load_tokenizer(source, "--model.tokenizer")
    directory, config = model_config(cfg.model.name_or_path)
    check_fit(config, directory, tok, source, max_seq_len=cfg.data.max_seq_len, flag="data.max_seq_len")
    data = load_data(cfg.data, tok)  # data errors before the (slow) model load
    print(f"data: {len(data.train)} train / {len(data.eval)} eval examples ({data.dropped} dropped)", file=sys.stderr)
    if cfg.train.eval_every and not data.eval:
        print(f"warning: train.eval_every={cfg.train.eval_every} does nothing without eval data; set "
              "--data.eval_path FILE or --data.eval_fraction 0.1", file=sys.stderr)
    model = load_model(directory, cfg.model, cfg.quantization)
    model = get_peft_model(model, cfg.lora, rngs=nnx.Rngs(params=cfg.model.seed, dropout=cfg.model.seed + 1))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result alone
        trainable, total = print_trainable_parameters(model)
    out.mkdir(parents=True, exist_ok=True)
    if is_primary():
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def report_eval(metrics: dict) -> None:  # the progress line shows the train loss only
        if "eval_loss" in metrics:
            print(f"step {metrics['step']}: eval_loss {metrics['eval_loss']:.4f}", file=sys.stderr)

    def write_adapter(m, path):  # with the tokenizer, so `eval` / `generate --adapter` take the directory alone
        save_adapter(m, path)
        tok.save(str(path))

    summary = train(
        model, data, data_cfg=cfg.data, optim_cfg=cfg.optim, train_cfg=cfg.train,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        write_adapter=write_adapter, resume=args.resume, run_info=cfg.to_dict(), on_step=report_eval,
    )
    with host_local(model):  # adapters sharded across processes are gathered for the writer
        if is_primary():
            write_adapter(model, out / "adapter")
    return {**summary, "adapter": str(out / "adapter"), "trainable_params": trainable, "all_params": total}


def _tokenizer_source(args) -> str:
    """--tokenizer, else the adapter's (train saves it beside the adapter), else the model's."""
    from jaxlora.tokenizer import has_tokenizer_files

    if args.tokenizer:
        return args.tokenizer
    if args.adapter and Path(args.adapter).is_dir() and has_tokenizer_files(args.adapter):
        return args.adapter
    return args.model


def _prepare(args, *, max_seq_len: int | None = None):
    """Tokenizer and model config of eval / generate / export, checked against each other (cheap)."""
    source = _tokenizer_source(args)
    tok = load_tokenizer(source, "--tokenizer")
    directory, config = model_config(args.model)
    check_fit(config, directory, tok, source, max_seq_len=max_seq_len, flag="--max-seq-len")
    if args.adapter and not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"--adapter {args.adapter}: no such directory (a PEFT adapter directory, e.g. "
                                "runs/x/adapter)")
    return directory, tok, config


def _load_with_adapter(args, directory):
    from jaxlora.peft_model import load_adapter

    mcfg = ModelConfig(name_or_path=args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantize=args.quantize)
    model = load_model(directory, mcfg, QuantConfig(compute_dtype=jnp.dtype(args.dtype)) if args.quantize else None)
    if args.adapter:
        model = load_adapter(model, args.adapter, rngs=nnx.Rngs(0))
    return model


def cmd_eval(args) -> dict:
    from jaxlora.evaluate import completion_accuracy, eval_loss
    from jaxlora.train.data import load_data
    from jaxlora.train.records import read_jsonl

    directory, tok, config = _prepare(args, max_seq_len=args.max_seq_len)
    max_seq_len = args.max_seq_len or min(EVAL_MAX_SEQ_LEN, config.max_position_embeddings)
    dcfg = DataConfig(path=args.data, max_seq_len=max_seq_len, batch_size=args.batch_size, overlong="truncate")
    data = load_data(dcfg, tok)  # data errors before the (slow) model load
    records = [r for _, r in read_jsonl(args.data)] if args.accuracy else []
    if args.accuracy and not all("prompt" in r for r in records):
        raise ValueError(f"--accuracy needs prompt/completion records; {args.data} has other records")
    model = _load_with_adapter(args, directory)
    loss = eval_loss(model, data.train, dcfg, pad_token_id=tok.pad_token_id or 0)
    result = {"eval_loss": loss, "perplexity": float(np.exp(loss)), "examples": len(data.train)}
    if args.accuracy:
        result["accuracy"], _ = completion_accuracy(model, tok, records)
    return result


def cmd_generate(args) -> dict:
    import jax

    from jaxlora.evaluate import encode_prompt
    from jaxlora.generate import generate

    directory, tok, _ = _prepare(args)
    model = _load_with_adapter(args, directory)
    ids = jnp.asarray([encode_prompt(tok, args.prompt)], jnp.int32)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   rng=jax.random.key(args.seed), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = [int(t) for t in np.asarray(out[0, ids.shape[1]:])]
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return {"prompt": args.prompt, "completion": tok.decode(new)}


def cmd_export(args) -> dict:
    from jaxlora.peft_model import merge_and_unload
    from jaxlora.fileio import check_directory_path
    from jaxlora.models.loading import save_pretrained

    if not args.adapter:
        raise ValueError("export needs --adapter (the PEFT adapter directory to merge)")
    check_directory_path(args.merged, "--merged")  # before the (slow) model load
    args.quantize = False  # merge into the full-precision base: no quantization error added
    directory, tok, _ = _prepare(args)
    model = _load_with_adapter(args, directory)
    model = merge_and_unload(model)
    path = save_pretrained(model, args.merged)
    tok.save(str(path))
    return {"merged": str(path)}


def _overrides(args) -> dict[str, dict]:
    for alias, target in ALIASES.items():
        value = getattr(args, alias, None)
        if value is not None:
            setattr(args, target, str(value))
    return config_io.flag_overrides(args, SECTIONS)


def _arg(kind: type, *, ge=None, gt=None, le=None):
    """An argparse `type` that also range-checks (NaN and infinities are never valid)."""

    def parse(text: str):
        value = text
        try:
            value = config_io.convert(text, kind, where="value")
            return number("value", value, integer=kind is int, ge=ge, gt=gt, le=le)
        except ValueError as e:  # "value='abc' is not a number", "value=-0.001 must be ...": say what was typed
            raise argparse.ArgumentTypeError(f"{text} {str(e).removeprefix(f'value={value!r} ')}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


SUBCOMMANDS = {
    "train": "Fine-tune LoRA / QLoRA adapters on a JSONL file; writes checkpoints, metrics, a loss plot and "
             "the final PEFT adapter to train.output_dir.",
    "eval": "Loss and perplexity (and, with --accuracy, exact-match accuracy of greedy completions) of a model, "
            "with or without an adapter, on a JSONL file.",
    "generate": "Complete one prompt with a model, with or without an adapter.",
    "export": "Merge an adapter into the full-precision base and save the result as a Hugging Face checkpoint.",
}
EPILOG = "User errors end in one line and exit code 2; --debug shows the Python traceback instead."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlora", description=__doc__.split("\n")[0], epilog=EPILOG)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name, help=text, description=text, epilog=EPILOG, parents=[common])
               for name, text in SUBCOMMANDS.items()}
    tr = parsers["train"]
    tr.add_argument("--config", help="YAML or JSON file with the sections below; flags override it")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    for alias, target in ALIASES.items():
        tr.add_argument(f"--{alias.replace('_', '-')}", dest=alias, metavar="V", help=f"same as --{target}")
    for name, cls in SECTIONS.items():
        config_io.add_flags(tr, name, cls)
    for name, fn in (("eval", cmd_eval), ("generate", cmd_generate), ("export", cmd_export)):
        p = parsers[name]
        p.add_argument("--model", required=True, help="base model directory (or hub id)")
        p.add_argument("--adapter", help="PEFT adapter directory (e.g. runs/x/adapter)")
        p.add_argument("--tokenizer", help="tokenizer directory, hub id, or 'byte' for the built-in byte "
                                           "tokenizer (default: the adapter's if it has one, else the model's)")
        p.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="dtype of the base weights and of the computation (default: float32)")
        p.add_argument("--no-quantize", dest="quantize", action="store_false",
                       help="keep the base dense (default: quantize it to NF4 while loading)")
        p.set_defaults(fn=fn)
    ev, gen, exp = (parsers[n] for n in ("eval", "generate", "export"))
    ev.add_argument("--data", required=True, help="JSONL file: text, prompt/completion or chat records")
    ev.add_argument("--max-seq-len", type=_arg(int, gt=0),
                    help=f"tokens per example; longer ones are truncated (default: {EVAL_MAX_SEQ_LEN}, or the "
                         "model's max_position_embeddings if smaller)")
    ev.add_argument("--batch-size", type=_arg(int, gt=0), default=8, help="examples per batch (default: 8)")
    ev.add_argument("--accuracy", action="store_true", help="exact-match accuracy of greedy completions")
    gen.add_argument("--prompt", required=True, help="the text to complete")
    gen.add_argument("--max-new-tokens", type=_arg(int, gt=0), default=32, help="at most this many (default: 32)")
    gen.add_argument("--temperature", type=_arg(float, ge=0), default=0.0,
                     help="0 is greedy decoding; > 0 samples (default: 0)")
    gen.add_argument("--top-p", type=_arg(float, gt=0, le=1), default=1.0,
                     help="nucleus sampling mass in (0, 1] (default: 1)")
    gen.add_argument("--seed", type=_arg(int, ge=0), default=0, help="sampling seed (default: 0)")
    exp.add_argument("--merged", required=True, help="output directory for the merged HF checkpoint")
    tr.set_defaults(fn=cmd_train)
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:  # "[Errno 28] No space left on device: 'x'"
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, KeyError):  # str(KeyError) is just the quoted key
        return f"missing key {e}"
    return str(e)


# A negative number in any spelling float() reads, "-1e-3", "-1.", "-inf" included. argparse takes only
# "-1" and "-.5" as values and any other word that starts with "-" as an option ("expected one argument").
NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-(inf|infinity|nan)", re.IGNORECASE)


def attach_negative_values(argv: list[str]) -> list[str]:
    """`--flag -1e-3` as `--flag=-1e-3`, the spelling argparse documents for a value that starts with "-",
    so that the value reaches the range check of its field (no option of ours looks like a number).

    >>> attach_negative_values(["train", "--optim.adam_epsilon", "-1e-3", "--lora.r", "-2"])
    ['train', '--optim.adam_epsilon=-1e-3', '--lora.r=-2']
    """
    out: list[str] = []
    for word in argv:
        prev = out[-1] if out else ""
        if NEGATIVE_NUMBER.fullmatch(word) and prev.startswith("--") and "=" not in prev and prev != "--":
            out[-1] = f"{prev}={word}"
        else:
            out.append(word)
    return out


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    from jaxlora.train.loop import NonFiniteLossError

    args = build_parser().parse_args(attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    prog = f"jaxlora {args.command}"
    try:
        result = args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, NonFiniteLossError, RunLockedError, SafetensorError) as e:
        if args.debug:
            raise
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not a user error: still one line, and how to see more
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
