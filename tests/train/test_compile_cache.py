"""jaxlora/train/compile_cache.py: where the cache goes, how it is turned off, and that a second
process loads what the first compiled (each run in a fresh interpreter: JAX's cache is process state)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlora.train import compile_cache

# A fresh process: enable the cache from the environment, compile one small program, and report the
# directory in use and JAX's cache events (a program this small is below JAX's default 1 s threshold).
_CHILD = """
import json, jax, jax.numpy as jnp
from jaxlora.train.compile_cache import enable_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = enable_compilation_cache()
jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3.0 + x)(jnp.arange(7.0)))
print(json.dumps({"path": None if path is None else str(path),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _child(env_value: str, home: Path) -> dict:
    env = dict(os.environ, HOME=str(home), **{compile_cache.ENV: env_value})
    env.pop("XDG_CACHE_HOME", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == tmp_path / "xdg" / "jaxlora" / "xla"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty means unset (XDG base directory spec)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "jaxlora" / "xla"


@pytest.mark.parametrize("value", ["0", "off", "OFF", "none", ""])
def test_env_turns_it_off(monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.cache_dir_from_env() is None


def test_env_names_a_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.cache_dir_from_env() == tmp_path / "c"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir_from_env() == tmp_path / "xdg" / "jaxlora" / "xla"


def test_second_process_loads_the_first_ones_program(tmp_path):
    cache = tmp_path / "cache"
    first = _child(str(cache), tmp_path / "home")
    assert first["path"] == str(cache)
    assert first["hits"] == 0 and first["misses"] >= 1
    assert any(cache.iterdir()), "the first process wrote no cache entry"
    second = _child(str(cache), tmp_path / "home")
    assert second["hits"] >= 1 and second["misses"] == 0
    assert not (tmp_path / "home" / ".cache").exists()  # an explicit directory replaces the default


def test_off_writes_nothing(tmp_path):
    result = _child("off", tmp_path / "home")
    assert result["path"] is None and result["hits"] == 0
    assert not (tmp_path / "home" / ".cache").exists()
