"""Test configuration shared by tests/ (JAX only) and parity_tests/ (against the PyTorch reference).

Strict JAX modes, as Equinox's tests set them: a silent upcast or a broadcast between mismatched ranks
is an error here rather than a quiet change of numbers.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Every test builds its models locally (tiny configs saved to tmp dirs), so a hub call is a bug: offline for
# this process and its subprocesses. Set before anything imports huggingface_hub, which reads it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The training loop turns on a persistent compilation cache under ~/.cache; tests must not write there
# (nor share executables between runs). Off for the CLI subprocesses the tests start: a run killed
# mid-write, or two processes writing one entry at once, would leave the next one a half-written entry.
os.environ["JAXLORA_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402

from jaxlora.train import compile_cache  # noqa: E402

# This process (each xdist worker) gets a cache of its own, <tmp>/jaxlora-tests-xla/<pid>, removed when it
# exits: a program one test compiled is loaded by the next that compiles it -- the suite builds the same
# tiny models again and again (a quarter of the in-process time, measured on three test files). A process
# that died (SIGKILL, an XLA abort) leaves its directory: the next run removes those of dead processes.
# tests/train/test_compile_cache.py sets its own.
_CACHES = Path(tempfile.gettempdir()) / "jaxlora-tests-xla"


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


for _old in _CACHES.glob("*") if _CACHES.is_dir() else ():
    if not _alive(_old.name):
        shutil.rmtree(_old, ignore_errors=True)
_CACHE = _CACHES / str(os.getpid())
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
compile_cache.enable_compilation_cache(_CACHE)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# The longest files first. `make test` hands whole files to two xdist workers in collection order; a long
# file taken near the end leaves the other worker idle until it finishes (the two-process resume test
# alone made the last two minutes of a run). Sorting is stable: every other file keeps its place.
# Files that start processes of their own alternate with ones that do not, so that the two workers do not
# start the two-process resume test and the CLI's kill-and-resume test (both under deadlines) at once.
_LONG_FIRST = ("tests/train/test_distributed.py", "tests/examples/test_experiments.py", "tests/test_cli.py",
               "tests/test_plan.py", "tests/benchmarks/test_gpu.py", "tests/train/test_step.py",
               "tests/train/test_sharding.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
