"""examples/demo.py with a user's model and data (`make demo ARGS="--model ... --data ..."`): the eval split
fits a small file, and an earlier demo's report, adapter and run are never replaced unasked."""

import json

import pytest

from examples import demo


def _rows(path, n):
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(n)))
    return path


def test_small_data_file_then_a_second_run_is_refused(tmp_path, base_dir, capsys):
    data, out = _rows(tmp_path / "small.jsonl", 12), tmp_path / "demo"
    argv = ["--model", base_dir, "--tokenizer", "byte", "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch-size", "4"]
    report = demo.main(argv)  # the default --eval-size 200 would take every row
    assert "holding out 2 of 12 rows" in capsys.readouterr().err
    assert "accuracy_before" in report and (out / "adapter" / "adapter_config.json").is_file()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"already holds an earlier demo's report\.json, adapter, finetune.*--out"):
        demo.main(argv)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing deleted or rewritten


def test_too_few_rows_are_refused_before_the_model_loads(tmp_path):
    data = _rows(tmp_path / "tiny.jsonl", 4)
    with pytest.raises(SystemExit, match="has 4 rows; at least 5 are needed"):
        demo.main(["--model", str(tmp_path / "no-such-model"), "--tokenizer", "byte", "--data", str(data),
                   "--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()
