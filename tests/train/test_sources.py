"""Every source `datasets` reads gives the examples, order and resume of the same records in JSONL.

The datasets are built here from Python lists (never the hub); the byte tokenizer makes every id known.
"""

import json

import numpy as np
import pytest

from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.data import DataConfig, DataState, load_data, train_batches
from jaxlora.train.loop import TrainConfig, read_metrics, train
from jaxlora.train.optim import OptimizerConfig
from jaxlora.train.sources import source_kind

datasets = pytest.importorskip("datasets")

TOK = ByteTokenizer()
ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(5) for b in range(4)]


def config(path, **kw):
    return DataConfig(**{"path": str(path), "max_seq_len": 16, "batch_size": 3, "seed": 2, **kw})


def tokens(store):
    return [(ex.input_ids.tolist(), ex.loss_mask.tolist()) for ex in store]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def reference(tmp_path):
    return tokens(load_data(config(write_jsonl(tmp_path / "ref.jsonl", ROWS)), TOK).train)


@pytest.fixture
def table():
    return datasets.Dataset.from_list([{**r, "id": i} for i, r in enumerate(ROWS)])  # an extra column, ignored


def _saved(ds, path):
    ds.save_to_disk(str(path))
    return path


WRITERS = {
    "parquet": lambda ds, d: (ds.to_parquet(str(d / "t.parquet")), d / "t.parquet")[1],
    "csv": lambda ds, d: (ds.to_csv(str(d / "t.csv"), index=False), d / "t.csv")[1],
    "json": lambda ds, d: (ds.to_json(str(d / "t.json")), d / "t.json")[1],
    "arrow": lambda ds, d: _saved(ds, d / "saved") / "data-00000-of-00001.arrow",
    "save_to_disk": lambda ds, d: _saved(ds, d / "saved"),
    "dataset_dict": lambda ds, d: _saved(datasets.DatasetDict(train=ds), d / "dict"),
    "directory": lambda ds, d: ((d / "dir").mkdir(), ds.to_parquet(str(d / "dir" / "train.parquet")), d / "dir")[2],
}


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("streaming", [False, True])
def test_every_source_gives_the_jsonl_examples(tmp_path, table, reference, kind, streaming):
    path = WRITERS[kind](table, tmp_path)
    cache = tmp_path / "cache" if streaming else None  # streaming tokenizes to files
    data = load_data(config(path, streaming=streaming, cache_dir=cache and str(cache)), TOK)
    assert tokens(data.train) == reference


def test_column_mapping_for_tables_and_jsonl(tmp_path, reference):
    renamed = [{"question": r["prompt"], "answer": r["completion"]} for r in ROWS]
    kw = dict(prompt_column="question", completion_column="answer")
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "qa.parquet"))
    assert tokens(load_data(config(tmp_path / "qa.parquet", **kw), TOK).train) == reference
    assert tokens(load_data(config(write_jsonl(tmp_path / "qa.jsonl", renamed), **kw), TOK).train) == reference
    with pytest.raises(ValueError, match=r"qa\.parquet\[train\]: the columns \['answer', 'question'\] fit no format"):
        load_data(config(tmp_path / "qa.parquet"), TOK)
    with pytest.raises(ValueError, match=r"format 'text' needs column\(s\) \['text'\].*data\.text_column"):
        load_data(config(tmp_path / "qa.parquet", format="text"), TOK)


def test_text_and_chat_tables(tmp_path):
    chat = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4)]
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chat])
    datasets.Dataset.from_dict({"conversation": chat}).to_parquet(str(tmp_path / "c.parquet"))
    got = load_data(config(tmp_path / "c.parquet", messages_column="conversation", max_seq_len=64), TOK).train
    assert tokens(got) == tokens(load_data(config(jsonl, max_seq_len=64), TOK).train)
    both = datasets.Dataset.from_dict({"text": ["x"], "prompt": ["p"], "completion": ["c"]})
    both.to_csv(str(tmp_path / "both.csv"), index=False)
    with pytest.raises(ValueError, match="fit several formats"):
        load_data(config(tmp_path / "both.csv"), TOK)
    assert load_data(config(tmp_path / "both.csv", format="text"), TOK).train[0].input_ids.tolist() == [256, 120, 257]


def test_bad_row_is_named(tmp_path):
    datasets.Dataset.from_dict({"text": ["fine", ""]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match=r"t\.parquet\[train\] row 1: empty text"):
        load_data(config(tmp_path / "t.parquet"), TOK)


def test_splits(tmp_path, table, reference):
    held = datasets.Dataset.from_list([{"prompt": "9+9=", "completion": "18", "id": 99}])  # splits share columns
    dd = _saved(datasets.DatasetDict(train=table, test=held), tmp_path / "dict")
    data = load_data(config(dd, eval_split="test"), TOK)
    assert tokens(data.train) == reference and len(data.eval) == 1
    d = tmp_path / "files"
    d.mkdir()
    table.to_parquet(str(d / "train.parquet"))
    held.to_parquet(str(d / "test.parquet"))
    assert len(load_data(config(d, eval_split="test"), TOK).eval) == 1
    eval_file = write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"text": "b"}])
    assert len(load_data(config(d, eval_path=str(eval_file)), TOK).eval) == 2
    with pytest.raises(ValueError, match=r"no split 'validation'; the saved DatasetDict has \['test', 'train'\]"):
        load_data(config(dd, split="validation"), TOK)
    with pytest.raises(ValueError, match="a JSONL file is the single split 'train'"):
        load_data(config(eval_file, split="test"), TOK)
    with pytest.raises(ValueError, match="not both"):
        config(dd, eval_split="test", eval_fraction=0.1)


def test_source_kinds(tmp_path):
    assert source_kind("HuggingFaceH4/no_robots") == "hub" and source_kind("imdb") == "hub"
    with pytest.raises(FileNotFoundError, match="data ./missing.parquet does not exist"):
        source_kind("./missing.parquet")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(ValueError, match=r"unknown type '\.txt'"):
        source_kind(str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="streaming=True needs cache_dir"):
        config("t.parquet", streaming=True)


class CountingTokenizer(ByteTokenizer):
    """Counts the texts it tokenizes; two instances have the same fingerprint, so they share a cache."""

    def __init__(self):
        self.calls = 0

    def encode_with_offsets(self, text):
        self.calls += 1
        return super().encode_with_offsets(text)


def test_token_cache_is_reused_and_keyed(tmp_path, table, reference):
    path = WRITERS["parquet"](table, tmp_path)
    cfg = config(path, cache_dir=str(tmp_path / "cache"))
    first = CountingTokenizer()
    assert tokens(load_data(cfg, first).train) == reference and first.calls == len(ROWS)
    again = CountingTokenizer()
    cached = load_data(cfg, again).train
    assert again.calls == 0 and tokens(cached) == reference and isinstance(cached.ids, np.memmap)
    assert tokens(cached[3:7]) == reference[3:7] and tokens(cached[::-2]) == reference[::-2]
    streamed = CountingTokenizer()  # streaming reads the same records: the same entry
    assert tokens(load_data(config(path, cache_dir=cfg.cache_dir, streaming=True), streamed).train) == reference
    assert streamed.calls == 0
    for changed in (dict(max_seq_len=12, overlong="drop"), dict(format="text", text_column="prompt")):
        tok = CountingTokenizer()
        load_data(config(path, cache_dir=cfg.cache_dir, **changed), tok)
        assert tok.calls == len(ROWS)  # another setting, another entry
    table.select(range(10)).to_parquet(str(path))  # the file changes: its entry is stale
    tok = CountingTokenizer()
    assert len(load_data(cfg, tok).train) == 10 and tok.calls == 10
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 4


@pytest.mark.parametrize("packing", [False, True])
def test_parquet_resume_sees_the_same_batches(tmp_path, table, packing):
    path = WRITERS["parquet"](table, tmp_path)
    cfg = config(path, packing=packing, streaming=True, cache_dir=str(tmp_path / "cache"), eval_fraction=0.2)
    examples = load_data(cfg, TOK).train
    full = [next(it) for it in [train_batches(examples, cfg, pad_token_id=258)] for _ in range(14)]
    assert full[-1][1].epoch >= 2
    for k in (0, 3, 6, 11):
        saved = json.loads(json.dumps(full[k][1].to_dict()))
        fresh = load_data(cfg, TOK).train  # as a resumed process would: from the cache
        resumed = train_batches(fresh, cfg, pad_token_id=258, start=DataState.from_dict(saved))
        for want, _ in full[k + 1 :]:
            got, _ = next(resumed)
            assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_training_on_parquet_resumes_to_the_uninterrupted_curve(tmp_path, table, byte_dense):
    path = WRITERS["parquet"](table, tmp_path)
    data_cfg = config(path, batch_size=4, eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))

    def run(out, *, resume=False, on_step=None):
        return train(
            byte_dense(0), load_data(data_cfg, TOK), data_cfg=data_cfg,
            optim_cfg=OptimizerConfig(learning_rate=3e-2, max_steps=8, warmup_steps=2),
            train_cfg=TrainConfig(output_dir=str(out), save_every=3, eval_every=4, progress=False),
            pad_token_id=TOK.pad_token_id, resume=resume, on_step=on_step,
        )

    def interrupt(metrics):
        if metrics["step"] == 5:
            raise KeyboardInterrupt  # after step 5, with the last checkpoint at step 3

    run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", on_step=interrupt)
    run(tmp_path / "split", resume=True)
    key = lambda d: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert key(tmp_path / "split") == key(tmp_path / "straight") and len(key(tmp_path / "straight")) == 10
