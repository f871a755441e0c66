"""One run per output directory: a lock file naming the process that holds it.

`output_dir/.jaxlora.lock` holds `{"pid": ..., "host": ..., "started": ...}`. It is created with
O_CREAT | O_EXCL, so of two runs starting together exactly one gets it. A lock left by a process that
was killed (kill -9, power loss) is stale: on the same host a pid that no longer exists proves it, and
the lock is taken over. A lock from another host cannot be checked from here; the error says which host
and pid to look at and that deleting the file releases it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_NAME = ".jaxlora.lock"
_TORN_GRACE_S = 10.0  # an unreadable lock younger than this may be one being written right now


class RunLockedError(RuntimeError):
    """Another live process trains into this output directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """Held while training: `with RunLock(output_dir): ...`. Re-entrant within one process (the CLI
    takes it before loading the model, `train()` again around the loop); released on exit by the
    outermost holder."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self._owner = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us may be re-taken by a third run meanwhile
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder == {} and not self.path.exists():
                    continue  # released between our attempt and the read
                if holder is not None and {k: holder.get(k) for k in self.me} == self.me:
                    return self  # ours already: a nested `with`
                if holder is None or not self._stale(holder):
                    raise RunLockedError(self._message(holder)) from None
                warnings.warn(f"taking over the stale lock {self.path} of {_who(holder)}, which no longer runs", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.me, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
                f.flush()
                os.fsync(f.fileno())
            self._owner = True
            return self
        raise RunLockedError(self._message(self._holder()))

    def __exit__(self, *exc) -> None:
        if self._owner:
            holder = self._holder()
            if holder is not None and {k: holder.get(k) for k in self.me} == self.me:
                self.path.unlink(missing_ok=True)
            self._owner = False

    def _holder(self) -> dict | None:
        """The lock's content; {} for a torn (unreadable) file old enough to be stale; None when it is
        unreadable but young (its writer may still be writing)."""
        try:
            holder = json.loads(self.path.read_text())
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except FileNotFoundError:
            return {}  # released meanwhile: retry
        except (OSError, ValueError):
            pass
        try:
            young = time.time() - self.path.stat().st_mtime < _TORN_GRACE_S
        except FileNotFoundError:
            return {}
        return None if young else {}

    def _stale(self, holder: dict) -> bool:
        if not holder:
            return True  # torn or vanished
        return holder.get("host") == self.me["host"] and not _alive(holder["pid"])

    def _message(self, holder: dict | None) -> str:
        who = _who(holder) if holder else "a process that is writing it now"
        return (
            f"output_dir {self.path.parent} is in use by another run ({who}, lock file {self.path}); "
            "wait for it to finish or choose another output_dir. If that process is gone (e.g. its host "
            "died), delete the lock file."
        )


def _who(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started', '?')}"
