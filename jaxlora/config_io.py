"""Frozen config dataclasses from YAML / JSON files and command-line flags, with unknown keys rejected.

A run's config is a mapping of sections, each onto one dataclass:

    model: {name_or_path: ./tiny-llama}
    lora: {r: 16, lora_alpha: 32}
    optim: {learning_rate: 2.0e-4, max_steps: 200}

Flags override the file: `--lora.r 16`, `--optim.learning_rate 2e-4` (one flag per field, generated
from the dataclasses, so `--help` lists every knob with its default).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import math
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal


def read_config_file(path: str | Path) -> dict:
    """A YAML (.yaml / .yml) or JSON file holding a mapping of sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # the [train] extra

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build(cls: type, values: dict, *, where: str) -> Any:
    """`cls(**values)` after checking every key is a field of `cls` and converting each value to its type."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys for {cls.__name__}: {sorted(fields)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:  # named as a user sets them, not as the dataclass's TypeError would ("__init__() missing ...")
        raise ValueError(f"{where}: missing required key(s) {missing}: set them in the {where!r} section of the "
                         f"config file or with {', '.join(f'--{where}.{k}' for k in missing)}")
    converted = {k: convert(v, hints[k], where=f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as e:  # the dataclass's own type or range check
        raise ValueError(f"{where}: {e}") from e


def convert(value: Any, hint: Any, *, where: str) -> Any:
    """Check / convert one value (from YAML, JSON or a flag string) to the field's annotated type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        sequence_first = isinstance(value, str) and (value.startswith("[") or "," in value)
        # A flag "q_proj,v_proj" or '["q_proj"]' for a `str | tuple[str, ...]` field means the list.
        args = sorted(args, key=lambda a: typing.get_origin(a) not in (list, tuple)) if sequence_first else args
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where=where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}={value!r} fits none of {hint}: {'; '.join(errors)}")
    if origin is Literal:
        for arg in args:
            if value == arg or (isinstance(value, str) and str(arg) == value):
                return arg
        raise ValueError(f"{where}={value!r} is not one of {list(args)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where}={value!r} is not a boolean (true / false)")
    if hint in (int, float):
        return _number(value, hint, where=where)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r} is not a string")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # a flag: JSON list, or comma-separated
            value = _json(value, where, "list") if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r} is not a list")
        item = args[0] if args else Any
        items = [convert(v, item, where=f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if isinstance(value, str):
            value = _json(value, where, "mapping")
        if not isinstance(value, dict):
            raise ValueError(f"{where}={value!r} is not a mapping")
        return dict(value)
    return value  # Any, or a type without a conversion rule: passed through to the dataclass's own check


def _json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        example = '{"q_proj": 4}' if what == "mapping" else '["q_proj", "v_proj"]'
        raise ValueError(f"{where}={text!r} is not a JSON {what} ({e.msg} at character {e.pos}); e.g. '{example}'") from None


def _number(value: Any, kind: type, *, where: str) -> int | float:
    """An int or float field from a number or a flag string; booleans are not numbers here."""
    what = "an integer" if kind is int else "a number"
    accepted = (int, str) if kind is int else (int, float, str)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ValueError(f"{where}={value!r} is not {what}")
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{where}={value!r} is not {what}") from None
    if not math.isfinite(number):  # "nan" and "inf" parse as floats but are valid for no field
        raise ValueError(f"{where}={value!r} is not a finite number")
    return number


def add_flags(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    """`--{section}.{field}` for every field of `cls`; values are strings, converted by `build`. Each flag's
    help is the comment the dataclass gives its field, then the default."""
    group = parser.add_argument_group(f"{section} ({cls.__name__})")
    docs = field_comments(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = "required"
        else:
            default = "default: " + _show(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        doc = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=None, metavar="V",
                           help=f"{doc} ({default})" if doc else default)


def _show(value: Any) -> str:
    """A default as a user would type it: dtype names, not `<class 'jax.numpy.bfloat16'>`."""
    if value is None:
        return "unset"
    if isinstance(value, type) and hasattr(value, "dtype"):  # jnp.bfloat16 and friends are scalar types
        return value.dtype.name
    if hasattr(value, "name") and type(value).__module__.startswith("numpy"):  # np.dtype
        return value.name
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the ``# comment`` after it, or on the lines just above it, in the class body.

    A comment per field is how the config dataclasses document themselves (STYLE.md); the CLI help reads
    those comments rather than a second copy that would drift."""
    import inspect

    try:
        tokens = list(tokenize.generate_tokens(iter(inspect.getsource(cls).splitlines(True)).__next__))
    except (OSError, TypeError, tokenize.TokenError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    by_line: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokens:
        if tok.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE):
            by_line.setdefault(tok.start[0], []).append(tok)
    out: dict[str, str] = {}
    above: list[str] = []
    for row in sorted(by_line):
        first, last = by_line[row][0], by_line[row][-1]
        if first.type == tokenize.COMMENT and first.start[1] == 4:  # a comment line in the class body
            above.append(first.string.lstrip("#").strip())
            continue
        if first.type == tokenize.NAME and first.string in names and first.start[1] == 4:
            trailing = [last.string.lstrip("#").strip()] if last.type == tokenize.COMMENT else []
            out[first.string] = " ".join(above + trailing)
        above = []
    return out


def flag_overrides(args: argparse.Namespace, sections: dict[str, type]) -> dict[str, dict]:
    """The `--section.field` flags that were given, as {section: {field: string value}}."""
    out: dict[str, dict] = {}
    for key, value in vars(args).items():
        if value is None or "." not in key:
            continue
        section, field = key.split(".", 1)
        if section in sections:
            out.setdefault(section, {})[field] = value
    return out


def merge_sections(file_cfg: dict, overrides: dict[str, dict], sections: dict[str, type]) -> dict[str, dict]:
    """File sections updated by flag overrides; a section the file names but jaxlora lacks is an error."""
    unknown = sorted(set(file_cfg) - set(sections))
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; valid sections: {sorted(sections)}")
    for name, values in file_cfg.items():
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"config section {name!r} must be a mapping of {sections[name].__name__} fields "
                             f"(e.g. {name}: {{key: value}}), got {type(values).__name__} {values!r}")
    merged = {name: dict(file_cfg.get(name) or {}) for name in sections}
    for name, values in overrides.items():
        merged[name].update(values)
    return merged
