"""Where records come from: a JSONL file read here, or whatever Hugging Face `datasets` reads.

`path` (DataConfig.path / eval_path) is one of:

- a `.jsonl` file: read line by line without `datasets`; every line must have exactly its format's
  keys (after the column mapping), so a misspelt key is an error that names the line;
- a `.json` / `.parquet` / `.arrow` / `.csv` file, or a directory of such files (splits inferred from
  the file names, e.g. `train.parquet`, `test.parquet`): `datasets.load_dataset`;
- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`: `datasets.load_from_disk`;
- anything else: a hub dataset id (`datasets.load_dataset(id, config_name)`; needs a network).

Tables have the same columns in every row: the format is detected from the column names once, the
mapped columns become the record keys of `jaxlora.train.records`, and other columns are ignored.
With `streaming`, rows are read one at a time (`IterableDataset`) and never held all at once.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from jaxlora.train.records import read_jsonl

# The record keys of each format (jaxlora.train.records), in the order they are reported.
FORMAT_KEYS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",)}
_BUILDERS = {".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict / Dataset)


def source_kind(path: str) -> str:
    """"jsonl", "file", "saved", "dir" or "hub"; a missing path that looks local is an error."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".jsonl":
            return "jsonl"
        if p.suffix in _BUILDERS:
            return "file"
        raise ValueError(f"data file {path}: unknown type {p.suffix!r}; expected .jsonl or one of {sorted(_BUILDERS)}")
    if p.is_dir():
        return "saved" if any((p / m).is_file() for m in _SAVED_MARKERS) else "dir"
    if p.suffix in (".jsonl", *_BUILDERS) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data {path} does not exist")
    return "hub"


def fingerprint(path: str, *, split: str, config_name: str | None) -> dict:
    """What identifies a source's records for the token cache: its files' paths, sizes and modification
    times, or the hub id (a hub dataset that changes under the same id needs its cache entry deleted)."""
    kind = source_kind(path)
    ident = {"kind": kind, "split": split, "config_name": config_name}
    if kind == "hub":
        return {**ident, "hub": path}
    p = Path(path).expanduser().resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {**ident, "path": str(p), "files": [[str(f.relative_to(p.parent)), f.stat().st_size,
                                                   f.stat().st_mtime_ns] for f in files]}


def read_records(
    path: str,
    *,
    split: str,
    columns: Mapping[str, str],
    format: str,
    streaming: bool = False,
    config_name: str | None = None,
    hf_cache_dir: str | None = None,
) -> Iterator[tuple[str, dict]]:
    """(where, record) for every row of `split`; `columns` maps record keys to column (or JSONL key) names."""
    kind = source_kind(path)
    if kind == "jsonl":
        if split != "train":
            raise ValueError(f"{path}: a JSONL file is the single split 'train', not {split!r}")
        rename = {col: key for key, col in columns.items() if col != key}
        for lineno, record in read_jsonl(path):
            yield f"{path}:{lineno}", {rename.get(k, k): v for k, v in record.items()}
        return
    ds = _load(path, kind, split=split, streaming=streaming, config_name=config_name, cache_dir=hf_cache_dir)
    rows = iter(ds)
    names = ds.column_names
    if names is None:  # a streamed source may know its columns only from its first row
        first = next(rows, None)
        names = [] if first is None else list(first)
        rows = itertools.chain([] if first is None else [first], rows)
    where = f"{path}[{split}]"
    mapping = table_mapping(names, columns, format, where)
    for i, row in enumerate(rows):
        yield f"{where} row {i}", {key: row[col] for key, col in mapping.items()}


def table_mapping(names: list[str], columns: Mapping[str, str], format: str, where: str) -> dict[str, str]:
    """{record key: column} of the one format whose mapped columns the table has."""
    have = set(names)
    fits = [f for f, keys in FORMAT_KEYS.items() if all(columns[k] in have for k in keys)]
    if format != "auto":
        missing = [columns[k] for k in FORMAT_KEYS[format] if columns[k] not in have]
        if missing:
            raise ValueError(f"{where}: format {format!r} needs column(s) {missing}; the columns are {sorted(have)} "
                             f"(map others with data.{FORMAT_KEYS[format][0]}_column=...)")
        fits = [format]
    if len(fits) != 1:
        wanted = {f: [columns[k] for k in keys] for f, keys in FORMAT_KEYS.items()}
        what = "fit several formats" if fits else "fit no format"
        raise ValueError(f"{where}: the columns {sorted(have)} {what}; the formats need {wanted}: set data.format, "
                         "or map columns with data.text_column / prompt_column / completion_column / messages_column")
    return {k: columns[k] for k in FORMAT_KEYS[fits[0]]}


def _datasets(path: str):
    try:
        import datasets  # the [data] extra
    except ImportError:
        raise ValueError(f"reading {path} needs Hugging Face datasets: pip install 'jaxlora[data]'") from None
    return datasets


def _load(path: str, kind: str, *, split: str, streaming: bool, config_name: str | None, cache_dir: str | None):
    datasets = _datasets(path)
    if kind == "saved":
        ds = datasets.load_from_disk(os.path.expanduser(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r}; the saved DatasetDict has {sorted(ds)}")
            ds = ds[split]
        elif split not in ("train", str(ds.split)):  # a saved Dataset is one split
            raise ValueError(f"{path}: a saved Dataset (split {ds.split}) has no split {split!r}")
        return ds.to_iterable_dataset() if streaming else ds
    kw = dict(split=split, streaming=streaming, cache_dir=cache_dir)
    if kind in ("file", "dir"):
        try:
            return _load_local(datasets, path, kind, kw)
        except FileNotFoundError:
            raise
        except Exception as e:  # a file the builder or pyarrow cannot parse; their errors omit its name
            cause = e.__cause__ or e  # under DatasetGenerationError, the parser's own error names the problem
            raise ValueError(f"data {path} could not be read by Hugging Face datasets: {type(cause).__name__}: "
                             f"{cause}") from e
    try:
        return datasets.load_dataset(path, config_name, **kw)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # offline, or no such dataset: say both readings of the name
        raise ValueError(f"data {path!r} is no local path, and loading it as a hub dataset failed: {e}") from e


def _load_local(datasets, path: str, kind: str, kw: dict):
    if kind == "file":
        file = os.path.expanduser(path)
        if Path(file).suffix == ".csv":  # every CSV cell is text; pandas would read a completion "42" as an int
            with open(file, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            kw["features"] = datasets.Features({name: datasets.Value("string") for name in header})
        return datasets.load_dataset(_BUILDERS[Path(file).suffix], data_files=file, **kw)
    return datasets.load_dataset(os.path.expanduser(path), **kw)  # a directory of data files
