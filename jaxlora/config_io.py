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
    converted = {k: convert(v, hints[k], where=f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**converted)
    except TypeError as e:  # a required field is missing
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
            value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r} is not a list")
        item = args[0] if args else Any
        items = [convert(v, item, where=f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"{where}={value!r} is not a mapping")
        return dict(value)
    return value  # Any, or a type without a conversion rule: passed through to the dataclass's own check


def _number(value: Any, kind: type, *, where: str) -> int | float:
    """An int or float field from a number or a flag string; booleans are not numbers here."""
    what = "an integer" if kind is int else "a number"
    accepted = (int, str) if kind is int else (int, float, str)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ValueError(f"{where}={value!r} is not {what}")
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{where}={value!r} is not {what}") from None


def add_flags(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    """`--{section}.{field}` for every field of `cls`; values are strings, converted by `build`."""
    group = parser.add_argument_group(f"{section} ({cls.__name__})")
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = "required" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
        group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=None, metavar="V",
                           help=f"default: {default}")


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
    merged = {name: dict(file_cfg.get(name) or {}) for name in sections}
    for name, values in overrides.items():
        merged[name].update(values)
    return merged
