"""The CLI's config reading (jaxlora/config_io.py): files, field conversion from YAML / JSON / flag strings, and
errors that name the key, the value and what would be valid. End to end through the CLI: tests/test_cli.py."""

import dataclasses
from typing import Literal

import pytest

from jaxlora import config_io


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    steps: int = 10
    rate: float = 1e-3
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    targets: str | tuple[str, ...] = "all-linear"
    extra: dict[str, int] | None = None


def test_read_config_file_json_yaml_and_errors(tmp_path):
    (tmp_path / "c.json").write_text('{"optim": {"lr": 1}}')
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1\n")
    (tmp_path / "empty.yml").write_text("")
    assert config_io.read_config_file(tmp_path / "c.json") == config_io.read_config_file(tmp_path / "c.yaml")
    assert config_io.read_config_file(tmp_path / "empty.yml") == {}
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        config_io.read_config_file(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        config_io.read_config_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="must hold a mapping of sections, got list"):
        config_io.read_config_file(tmp_path / "list.json")


def test_build_converts_flag_strings_to_the_field_types():
    got = config_io.build(Section, {"name": "x", "steps": "3", "rate": "-1e-3", "flag": "yes", "mode": "b",
                                    "targets": "q_proj,v_proj", "extra": '{"k": 1}'}, where="s")
    assert got == Section(name="x", steps=3, rate=-1e-3, flag=True, mode="b", targets=("q_proj", "v_proj"),
                          extra={"k": 1})
    assert config_io.build(Section, {"name": "x", "targets": "all-linear", "extra": "none"}, where="s") == \
        Section(name="x")
    assert config_io.build(Section, {"name": "x", "targets": '["q_proj"]'}, where="s").targets == ("q_proj",)


@pytest.mark.parametrize("values, match", [
    ({"name": "x", "step": 1}, r"s: unknown key\(s\) \['step'\]; valid keys for Section: \['extra', 'flag', "),
    ({}, r"s: missing required key\(s\) \['name'\].*--s.name"),
    ({"name": "x", "steps": "1.5"}, r"s.steps='1.5'"),
    ({"name": "x", "steps": True}, r"s.steps=True"),
    ({"name": "x", "flag": "maybe"}, r"s.flag='maybe' is not a boolean"),
    ({"name": "x", "mode": "c"}, r"s.mode='c' is not one of \['a', 'b'\]"),
    ({"name": 3}, r"s.name=3 is not a string"),
    ({"name": "x", "extra": "[1"}, r"s.extra"),
])
def test_build_errors_name_the_key_and_what_is_valid(values, match):
    with pytest.raises(ValueError, match=match):
        config_io.build(Section, values, where="s")


def test_build_refuses_a_section_that_is_not_a_mapping():
    with pytest.raises(ValueError, match="s must be a mapping of Section fields, got list"):
        config_io.build(Section, [1], where="s")
