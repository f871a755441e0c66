"""Bad inputs, API and CLI: each gets one clear error (its type or exit code, and a message naming the
offending field, file or value), never a traceback, a NaN loss or a silently different run; and inputs
that are legal but unusual work.

Most CLI cases fail before any weight is read, so they run against a model directory that holds only a
config.json: reaching the (absent) weights would itself fail the test.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlora import LoraConfig, QuantConfig, dequantize_4bit, from_bnb_state_dict, quantize_4bit, to_bnb_state_dict
from jaxlora.cli import ModelConfig, main
from jaxlora.generate import generate
from jaxlora.models.config import LlamaConfig
from jaxlora.models.hf_files import INDEX_FILE, load_config, weight_files
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.loading import from_pretrained, save_pretrained
from jaxlora.peft_io import read_adapter_config
from jaxlora.peft_model import get_peft_model, save_adapter
from jaxlora.tokenizer import ByteTokenizer, load_tokenizer
from jaxlora.train.data import DataConfig
from jaxlora.train.loop import TrainConfig
from jaxlora.train.optim import OptimizerConfig
from tests._models import BYTE_LLAMA

TOK = ByteTokenizer()
TINY = BYTE_LLAMA | dict(model_type="llama", num_hidden_layers=1)  # the config.json fields of base_dir below


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = LlamaConfig(**TINY)
    return save_pretrained(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("m") / "tiny")


def config_only(root: Path, name: str, **changes) -> Path:
    """A model directory with a config.json and no weights."""
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY | changes))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {"ok": config_only(root, "ok"), "vocab320": config_only(root, "vocab320", vocab_size=320),
            "vocab200": config_only(root, "vocab200", vocab_size=200)}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    return path


# --- API --------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

API_CONFIG_CASES = [
    (OptimizerConfig, dict(adam_beta1=2.0), "adam_beta1=2.0"),
    (OptimizerConfig, dict(optim="sgd", momentum=5.0), "momentum=5.0"),
    (OptimizerConfig, dict(adam_epsilon=-1e-3), "adam_epsilon=-0.001"),
    (OptimizerConfig, dict(adam_epsilon=0.0), "adam_epsilon=0.0"),
    (OptimizerConfig, dict(weight_decay=NAN), "weight_decay=nan"),
    (OptimizerConfig, dict(adam_beta2=-1.0), "adam_beta2=-1.0"),
    (OptimizerConfig, dict(learning_rate=INF), "learning_rate=inf"),
    (OptimizerConfig, dict(max_grad_norm=NAN), "max_grad_norm=nan"),
    (OptimizerConfig, dict(max_steps=2.5), "max_steps=2.5"),
    (LoraConfig, dict(lora_alpha=NAN), "lora_alpha=nan"),
    (LoraConfig, dict(lora_alpha=INF), "lora_alpha=inf"),
    (LoraConfig, dict(alpha_pattern={"q_proj": INF}), "alpha_pattern"),
    (LoraConfig, dict(init_lora_weights="loftq", loftq_config={"loftq_iter": 0}), "loftq_iter"),
    (DataConfig, dict(path="x", max_seq_len=8, batch_size=2, seed=-1), "seed=-1"),
    (DataConfig, dict(path="x", max_seq_len=8, batch_size=2, eval_fraction=NAN), "eval_fraction"),
    (DataConfig, dict(path="x", max_seq_len=NAN, batch_size=2), "max_seq_len=nan"),
    (DataConfig, dict(path="x", max_seq_len=8, batch_size=2.5), "batch_size=2.5"),
    (DataConfig, dict(path="x", max_seq_len=8, batch_size=True), "batch_size=True"),
    (TrainConfig, dict(eval_every=NAN), "eval_every=nan"),
    (TrainConfig, dict(save_every=2.5), "save_every=2.5"),
    (TrainConfig, dict(log_every=INF), "log_every=inf"),
    (TrainConfig, dict(save_total_limit=0), "save_total_limit=0"),
    (TrainConfig, dict(mesh_data=0), "mesh_data=0"),
    (TrainConfig, dict(mesh_fsdp=-1), "mesh_fsdp=-1"),
    (ModelConfig, dict(name_or_path="m", seed=1.5), "seed=1.5"),
    (QuantConfig, dict(blocksize=64.0), "blocksize"),
    (LlamaConfig, dict(rope_theta=NAN), "rope_theta=nan"),
    (LlamaConfig, dict(hidden_size=100, num_attention_heads=3), "num_attention_heads=3"),
]


@pytest.mark.parametrize("cls, kwargs, needle", API_CONFIG_CASES, ids=lambda x: getattr(x, "__name__", None))
def test_config_dataclasses_refuse_out_of_range_values(cls, kwargs, needle):
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    assert needle in str(e.value)


HF_CONFIG_CASES = [
    (dict(rms_norm_eps=-1), "rms_norm_eps=-1"),
    (dict(hidden_size="64"), "hidden_size='64'"),
    (dict(hidden_size=-64), "hidden_size=-64"),
    (dict(num_attention_heads=0), "num_attention_heads=0"),
    (dict(rms_norm_eps="abc"), "rms_norm_eps='abc'"),
    (dict(rope_theta="abc"), "rope_theta='abc'"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings='no'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "rope_scaling.factor=-2.0"),
]


@pytest.mark.parametrize("changes, needle", HF_CONFIG_CASES)
def test_hf_config_values_name_file_and_key(tmp_path, changes, needle):
    d = config_only(tmp_path, "m", **changes)
    with pytest.raises(ValueError) as e:
        load_config(d)
    assert str(d / "config.json") in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("name, reader", [("config.json", load_config), ("adapter_config.json", read_adapter_config)])
def test_json_list_instead_of_object_names_the_file(tmp_path, name, reader):
    (tmp_path / name).write_text("[1, 2]")
    with pytest.raises(ValueError) as e:
        reader(tmp_path)
    assert str(tmp_path / name) in str(e.value) and "list" in str(e.value)


def _bnb_state(**meta_changes):
    sd = to_bnb_state_dict(quantize_4bit(jax.random.normal(jax.random.key(0), (8, 64)), compress_statistics=True))
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key]).decode()) | meta_changes
    for k in [k for k, v in meta.items() if v is None]:
        del meta[k]
    return sd | {key: np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()}


@pytest.mark.parametrize("changes, needle", [
    (dict(shape=None), "'shape' must be a list"),
    (dict(shape="64x64"), "'64x64'"),
    (dict(nested_offset="x"), "'nested_offset' must be a finite number, got 'x'"),
    (dict(blocksize="64"), "'blocksize' must be an int"),
])
def test_bnb_quant_state_errors_name_the_field(changes, needle):
    with pytest.raises(ValueError) as e:
        from_bnb_state_dict(_bnb_state(**changes))
    assert needle in str(e.value) and "weight.quant_state.bitsandbytes__nf4" in str(e.value)


@pytest.mark.parametrize("index", ["{not json", '{"metadata": {}}', '{"weight_map": ["a"]}', "[1]"])
def test_sharded_index_errors_name_the_file(tmp_path, index):
    (tmp_path / INDEX_FILE).write_text(index)
    with pytest.raises(ValueError) as e:
        weight_files(tmp_path)
    assert str(tmp_path / INDEX_FILE) in str(e.value)


def test_nan_weight_quantized_on_load_names_the_tensor(tmp_path, base_dir):
    bad = tmp_path / "nan-model"
    bad.mkdir()
    (bad / "config.json").write_text((base_dir / "config.json").read_text())
    tensors = load_file(base_dir / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        from_pretrained(bad, quantization=QuantConfig(compute_dtype=jnp.float32))
    assert "model.layers.0.mlp.up_proj.weight" in str(e.value) and "non-finite" in str(e.value)


def test_float_blocksize_is_refused_before_jax():
    with pytest.raises(ValueError, match="blocksize must be one of .* got 64.0"):
        quantize_4bit(jnp.ones((128,)), blocksize=64.0)


def test_save_adapter_under_a_file_names_the_file(tmp_path, base_dir):
    model = get_peft_model(from_pretrained(base_dir), LoraConfig(r=2), rngs=nnx.Rngs(0))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        save_adapter(model, tmp_path / "file" / "sub")
    assert f"{tmp_path / 'file'} is a file" in str(e.value)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=NAN), "temperature=nan"), (dict(temperature=INF), "temperature=inf"),
    (dict(top_p=NAN), "top_p=nan"), (dict(max_new_tokens=2.0), "max_new_tokens"),
])
def test_generate_refuses_non_finite_sampling_settings(base_dir, kwargs, needle):
    model = from_pretrained(base_dir)
    with pytest.raises(ValueError, match=needle):
        generate(model, jnp.ones((1, 3), jnp.int32), **({"max_new_tokens": 2, "rng": jax.random.key(0)} | kwargs))


def test_tokenizer_errors_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no tokenizer.*'byte'"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer /nope: no such directory"):
        load_tokenizer("/nope")


# --- CLI --------------------------------------------------------------------------------------------


def _train(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--model.tokenizer",
            "byte", "--data.max_seq_len", "16", "--data.batch_size", "4", "--train.progress", "false", *extra]


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# (extra train flags, what stderr must name); each fails before the (absent) weights are read.
CLI_TRAIN_CASES = [
    (["--optim.adam_beta1", "2"], "optim: adam_beta1=2.0 must be a finite number in [0, 1)"),
    (["--optim.optim", "sgd", "--optim.momentum", "5"], "momentum=5.0"),
    (["--optim.adam_epsilon", "-1e-3"], "adam_epsilon=-0.001 must be a finite number > 0"),  # not a flag
    (["--optim.adam_epsilon=-1e-3"], "adam_epsilon=-0.001"),
    (["--optim.learning_rate", "-1.5E2"], "learning_rate=-150.0"),
    (["--optim.learning_rate", "-inf"], "optim.learning_rate='-inf' is not a finite number"),
    (["--lora.lora_dropout", "-.5"], "lora_dropout=-0.5"),
    (["--lora.r", "-2"], "r=-2"),
    (["--optim.adam_epsilon", "0"], "adam_epsilon=0.0"),
    (["--optim.weight_decay", "nan"], "optim.weight_decay='nan' is not a finite number"),
    (["--optim.adam_beta2", "-1"], "adam_beta2=-1.0"),
    (["--optim.learning_rate", "inf"], "optim.learning_rate='inf' is not a finite number"),
    (["--lora.lora_alpha", "nan"], "lora.lora_alpha='nan'"),
    (["--lora.lora_alpha", "inf"], "lora.lora_alpha='inf'"),
    (["--lora.rank_pattern", "{bad"], "lora.rank_pattern='{bad' is not a JSON mapping"),
    (["--lora.target_modules", "[bad"], "target_modules: '[bad' is not a valid regex"),
    (["--quantization.compute_dtype", "float8"], "quantization.compute_dtype='float8'"),
    (["--train.log_every", "0"], "log_every=0"),
    (["--model.seed", "-1"], "seed=-1"),
    (["--data.max_seq_len", "1000"], "data.max_seq_len=1000 exceeds the model's max_position_embeddings=64"),
]


@pytest.mark.parametrize("extra, needle", CLI_TRAIN_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_cli_train_bad_values(tmp_path, models, data_file, capsys, extra, needle):
    code, err = _cli(_train(models["ok"], data_file, tmp_path / "run", *extra), capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("text, needle", [
    ('{"lora": 5}', "config section 'lora' must be a mapping of LoraConfig fields"),
    ('{"optim": {"adam_beta1": 2}}', "optim: adam_beta1=2"),
    ('[1]', "must hold a mapping of sections"),
    ("{bad", "is not valid JSON"),
])
def test_cli_config_file_errors(tmp_path, models, data_file, capsys, text, needle):
    cfg = tmp_path / "run.json"
    cfg.write_text(text)
    code, err = _cli(_train(models["ok"], data_file, tmp_path / "run", "--config", cfg), capsys)
    assert code == 2 and needle in err, err


def test_cli_yaml_section_that_is_not_a_mapping(tmp_path, models, data_file, capsys):
    pytest.importorskip("yaml")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora: 5\n")
    code, err = _cli(_train(models["ok"], data_file, tmp_path / "run", "--config", cfg), capsys)
    assert code == 2 and "config section 'lora'" in err


def test_cli_paths_and_files(tmp_path, models, data_file, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _cli(_train(models["ok"], data_file, tmp_path / "file"), capsys)
    assert code == 2 and f"train.output_dir {tmp_path / 'file'} is a file" in err
    code, err = _cli(_train(models["ok"], data_file, tmp_path / "file" / "run"), capsys)
    assert code == 2 and f"{tmp_path / 'file'} is a file" in err
    code, err = _cli(_train(models["ok"], data_file, tmp_path / "r", "--model.tokenizer", "/nope"), capsys)
    assert code == 2 and "tokenizer /nope: no such directory" in err and "--model.tokenizer" in err
    argv = [a for a in _train(models["ok"], data_file, tmp_path / "r") if a not in ("--model.tokenizer", "byte")]
    code, err = _cli(argv, capsys)
    assert code == 2 and "holds no tokenizer" in err and "'byte'" in err
    code, err = _cli(_train(tmp_path / "no-model", data_file, tmp_path / "r"), capsys)
    assert code == 2 and f"{tmp_path / 'no-model'}: no such checkpoint directory" in err


def test_cli_data_errors_come_before_the_model_load(tmp_path, models, capsys):
    # models["ok"] has no weights: reaching the model load would give another error.
    code, err = _cli(_train(models["ok"], tmp_path / "missing.jsonl", tmp_path / "r"), capsys)
    assert code == 2 and "missing.jsonl" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    code, err = _cli(_train(models["ok"], bad, tmp_path / "r"), capsys)
    assert code == 2 and f"{bad}:2" in err


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
@pytest.mark.parametrize("model, needle", [("vocab320", "vocab_size 320"), ("vocab200", "has 259 ids but")])
def test_cli_tokenizer_and_model_vocab_must_fit(tmp_path, models, data_file, capsys, command, model, needle):
    argv = {
        "train": _train(models[model], data_file, tmp_path / "r"),
        "eval": ["eval", "--model", models[model], "--tokenizer", "byte", "--data", data_file],
        "generate": ["generate", "--model", models[model], "--tokenizer", "byte", "--prompt", "1+1="],
    }[command]
    code, err = _cli(argv, capsys)
    assert code == 2 and needle in err and str(models[model]) in err, err


def test_cli_eval_checks_max_seq_len(models, data_file, capsys):
    code, err = _cli(["eval", "--model", models["ok"], "--tokenizer", "byte", "--data", data_file,
                      "--max-seq-len", "100000"], capsys)
    assert code == 2 and "--max-seq-len=100000 exceeds the model's max_position_embeddings=64" in err


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "0"),
                                         ("--max-new-tokens", "0"), ("--top-p", "inf"), ("--temperature", "-1e-3"),
                                         ("--seed", "-1e3")])
def test_cli_generate_refuses_bad_sampling_flags(models, capsys, flag, value):
    code, err = _cli(["generate", "--model", models["ok"], "--tokenizer", "byte", "--prompt", "x", flag, value],
                     capsys)
    assert code == 2 and f"argument {flag}" in err and value in err


def test_cli_export_to_a_file(tmp_path, models, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _cli(["export", "--model", models["ok"], "--adapter", tmp_path, "--merged", tmp_path / "file"],
                     capsys)
    assert code == 2 and f"--merged {tmp_path / 'file'} is a file" in err


def test_cli_eval_every_without_eval_data_warns(tmp_path, models, data_file, capsys):
    code, err = _cli(_train(models["ok"], data_file, tmp_path / "r", "--eval-every", "50"), capsys)
    assert "train.eval_every=50 does nothing without eval data" in err
    assert code == 2  # and then the weightless model fails to load, after the warning


def test_cli_resume_of_a_finished_run_says_so(tmp_path, models, data_file, capsys):
    (tmp_path / "r" / "checkpoint-000006").mkdir(parents=True)
    code = main([str(a) for a in _train(models["ok"], data_file, tmp_path / "r", "--max-steps", "6", "--resume")])
    captured = capsys.readouterr()
    assert code == 0 and "already finished" in captured.err and "step 6 of max_steps=6" in captured.err
    assert json.loads(captured.out)["finished"] is True


def test_cli_debug_shows_the_exception(tmp_path, models, data_file):
    with pytest.raises(ValueError, match="adam_beta1"):
        main([str(a) for a in _train(models["ok"], data_file, tmp_path / "r", "--optim.adam_beta1", "2", "--debug")])


@pytest.mark.parametrize("command", ["train", "eval", "generate", "export"])
def test_cli_help_is_readable(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "<class" not in text and "default: X (default" not in text
    from jaxlora.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    assert sub.description
    assert all(a.help for a in sub._actions), [a.dest for a in sub._actions if not a.help]
    if command == "train":
        assert "--quantization.compute_dtype V" in text and "default: bfloat16" in text


# --- legal but unusual ------------------------------------------------------------------------------


def test_fp16_max_and_a_one_element_tensor_quantize():
    w = jnp.asarray([65504.0, -65504.0, 1.0, 0.0] * 16, jnp.float16)
    back = np.asarray(dequantize_4bit(quantize_4bit(w)), np.float32)
    assert np.all(np.isfinite(back)) and back[0] == 65504.0 and back[1] == -65504.0  # absmax is exact
    one = quantize_4bit(jnp.asarray([0.3], jnp.float32))
    assert one.shape == (1,) and float(dequantize_4bit(one)[0]) == pytest.approx(0.3)  # 0.3 is the absmax: code 1.0


def test_unusual_but_valid_settings_are_accepted(tmp_path):
    OptimizerConfig(adam_beta1=0.0, momentum=0.0, weight_decay=0.0, warmup_steps=1000, max_steps=1000)
    LoraConfig(lora_alpha=1e-3, rank_pattern={"q_proj": 1})
    d = config_only(tmp_path, "m", pad_token_id=-1, eos_token_id=[2, 3], rope_theta=500000)
    assert load_config(d).eos_token_id == (2, 3)
    assert math.isclose(load_config(d).rope_theta, 500000.0)


def test_flag_strings_for_mappings_and_lists_parse():
    from jaxlora.cli import resolve_config

    cfg = resolve_config({}, {"model": {"name_or_path": "m"}, "data": {"path": "d", "max_seq_len": "8",
                                                                        "batch_size": "2"},
                              "lora": {"rank_pattern": '{"q_proj": 4}', "target_modules": '["q_proj"]'}})
    assert dict(cfg.lora.rank_pattern) == {"q_proj": 4} and cfg.lora.target_modules == ("q_proj",)


def test_cli_generate_with_a_long_prompt(base_dir, capsys):
    # 1 bos + 56 prompt + 4 new = 61 of the model's 64 positions
    code = main(["generate", "--model", str(base_dir), "--tokenizer", "byte", "--prompt", "7" * 56,
                 "--max-new-tokens", "4", "--no-quantize"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["prompt"] == "7" * 56


def test_cli_eval_default_max_seq_len_fits_a_short_model(base_dir, data_file, capsys):
    # the default 512 exceeds this model's 64 positions: the default is then the model's limit, not an error
    code = main(["eval", "--model", str(base_dir), "--tokenizer", "byte", "--data", str(data_file), "--no-quantize"])
    assert code == 0 and json.loads(capsys.readouterr().out)["examples"] == 16


def test_cli_unreadable_data_and_missing_keys_name_them(tmp_path, models, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.parquet").write_bytes(b"not parquet at all")
    code, err = _cli(["eval", "--model", models["ok"], "--tokenizer", "byte", "--data", tmp_path / "d",
                      "--max-seq-len", "16"], capsys)
    assert code == 2 and f"data {tmp_path / 'd'} could not be read" in err, err
    code, err = _cli(["train", "--model", models["ok"], "--data", tmp_path / "x.jsonl"], capsys)
    assert code == 2 and "--data.max_seq_len, --data.batch_size" in err, err
