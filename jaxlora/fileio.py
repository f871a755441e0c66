"""Writing a directory so that a crash never leaves it half-written (model, adapter and checkpoint saves)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def check_directory_path(target: str | os.PathLike, what: str = "output directory") -> Path:
    """`target` as a Path; NotADirectoryError naming the culprit when it, or a folder above it, is a file."""
    target = Path(target)
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == target else f"cannot be created: {path} is a file"
            raise NotADirectoryError(f"{what} {target} {where}; give a directory path")
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, keep: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; when the block succeeds it becomes `target`.

    If `target` exists, its entries that the new content does not provide and that `keep(name)` accepts
    (say, tokenizer files beside model weights) are carried over as hard links; the old directory is
    then renamed aside, the new one renamed into place, and the old one deleted. Readers see the old
    directory or the new one, never a mix. If the block raises, `target` is untouched. A crash between
    the two renames leaves the previous content whole in ``.NAME.old-PID`` beside it.
    """
    target = check_directory_path(target, "directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            for entry in target.iterdir():
                if (tmp / entry.name).exists() or not keep(entry.name):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, copy_function=os.link)
                else:
                    os.link(entry, tmp / entry.name)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
