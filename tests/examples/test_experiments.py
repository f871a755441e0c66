"""The seed experiments end to end at a tiny size: each gives a table, a plot and sane numbers.

One tiny base and one `Lab` serve every test (runs are shared by (LoraConfig, task), as in the script),
so the whole file trains seven 3-step adapters.
"""

import json
import math

import pytest

import jaxlora
from examples import common, experiments
from examples.exp_combine import COMBINATIONS, combine
from examples.exp_lab import Lab, Settings
from examples.exp_memory import memory
from examples.exp_training import alpha, rank, targets

# Each experiment's result is a table and a plot: without matplotlib (the "train" extra) there is no result.
pytest.importorskip("matplotlib")

# One decoder layer whose in_features are multiples of 64 (NF4 blocks); 30 pretraining steps because
# pretrain_base warms up for 30.
TINY = common.BaseRecipe(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, corpus_lines=200, steps=30, batch_size=8)


def layer_dims(recipe):
    """(in, out) of each linear layer of one decoder layer, from the recipe alone (not from the model)."""
    h, i = recipe.hidden_size, recipe.intermediate_size
    kv = recipe.num_key_value_heads * h // recipe.num_attention_heads
    attention = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    mlp = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return attention, mlp


def lora_params(r, dims):
    """A is (in, r), B is (r, out): r * (in + out) per layer (2·d·r for a square d x d layer)."""
    return TINY.num_hidden_layers * sum(r * (i + o) for i, o in dims.values())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiments")
    base = common.pretrain_base(tmp / "demo", TINY)
    return Lab(Settings(out=tmp / "out", base_dir=base, steps=3, batch_size=8, eval_size=4))


def check_result(result, n_rows):
    assert len(result.rows) == n_rows and all(len(row) == len(result.header) for row in result.rows)
    assert result.notes and "nan" not in result.notes.lower()
    with open(result.plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    json.dumps(result.data, default=str)  # what experiments.json will hold


def check_run(run):
    assert run.diverged_at is None and math.isfinite(run.loss) and run.loss > 0
    assert len(run.curve) == 3 and run.tokens_per_s > 0
    assert all(0.0 <= a <= 1.0 for a in run.accuracy.values())


def test_rank(lab):
    attention, mlp = layer_dims(TINY)
    result = rank(lab, ranks=(2, 4))
    check_result(result, 2)
    for r in (2, 4):
        run = lab.run(f"rank_r{r}", jaxlora.LoraConfig(r=r, lora_alpha=2 * r))  # cached
        check_run(run)
        assert run.trainable == run.expected_trainable == lora_params(r, {**attention, **mlp})
        assert result.data[str(r)]["trainable"] == run.trainable


def test_alpha(lab):
    result = alpha(lab, r=4, alphas=(1, 8, 256))
    check_result(result, 3)
    scalings = [row[1] for row in result.rows]
    assert scalings == ["0.25", "2", "64"]
    for a in ("1", "8", "256"):
        assert result.data[a]["curve"] and result.data[a]["curve"][0][0] == 1
    # B starts at zero, so every alpha starts from the base's loss on the same first batch
    first = {result.data[a]["curve"][0][1] for a in ("1", "8", "256")}
    assert max(first) - min(first) < 1e-5


def test_targets(lab):
    attention, mlp = layer_dims(TINY)
    result = targets(lab, r=4)
    check_result(result, 2)
    att, full = result.data.values()
    assert att["trainable"] == lora_params(4, attention)
    assert full["trainable"] == lora_params(4, {**attention, **mlp})


def test_combine(lab):
    chosen = [c for c in COMBINATIONS if c[0] in ("linear 1.0/1.0", "svd 1.0/1.0, rank 2r")]  # one of each kind
    result = combine(lab, r=4, combinations=chosen)
    check_result(result, 3 + len(chosen))
    scores = result.data["accuracy"]
    assert all(0.0 <= v <= 1.0 for row in scores.values() for v in row.values())
    assert set(next(iter(scores.values()))) == {"addition", "subtraction"}
    assert result.data["add_unchanged_by_sub_training"]
    rank, distance = result.data["rank_and_distance"]["svd 1.0/1.0, rank 2r"]
    # rank 2r holds the sum of two rank-r updates exactly; the bound is float32 SVD round-off, far above 1e-6
    assert rank == 8 and distance < 1e-4
    assert result.data["rank_and_distance"]["linear 1.0/1.0"][0] == 4


def test_memory(lab):
    result = memory(lab)
    check_result(result, 4 + 5 * 3)
    demo = {d["format"]: d for d in result.data["demo"]}
    # Every tiny layer's size is a multiple of 64: codes + one fp32 absmax per 64 weights, exactly.
    assert demo["NF4"]["measured_bits"] == 4.5 and demo["8-bit blockwise"]["measured_bits"] == 8.5
    # DQ: 8-bit absmax per 64 plus fp32 scales per 256 blocks; a partial nested block costs a little more.
    assert common.BITS_PER_WEIGHT["NF4 + DQ"] <= demo["NF4 + DQ"]["measured_bits"] < 4.2
    llama = {(r["model"], r["format"]): r for r in result.data["llama"]}
    assert llama[("7B", "bf16")]["params"] == 6_738_415_616  # Llama-2-7b's published count
    assert llama[("70B", "NF4 + DQ")]["gb"] < llama[("70B", "NF4")]["gb"] < llama[("70B", "bf16")]["gb"]


def test_cli_writes_and_merges(lab, tmp_path):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--base-out", str(lab.settings.base_dir.parent), "--only", "memory"]
    experiments.main(argv, recipe=TINY)
    first = json.loads((out / "experiments.json").read_text())
    first["rank"] = {"markdown": "## an earlier rank table\n"}  # as if an earlier invocation ran it
    (out / "experiments.json").write_text(json.dumps(first))
    experiments.main(argv, recipe=TINY)
    md = (out / "experiments.md").read_text()
    assert md.index("an earlier rank table") < md.index("## Memory")  # kept, in the experiments' order
    assert (out / "memory.png").is_file()
