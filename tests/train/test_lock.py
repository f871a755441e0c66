"""One run per output directory: a live holder refuses a second run before it writes anything, a dead
one's lock is taken over, and the lock is released on exit, also after an error."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlora.cli import main
from jaxlora.train.lock import LOCK_NAME, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[2]
# A second process that holds the lock until its stdin closes (lock.py imports nothing heavy).
HOLDER = (
    "import sys; from jaxlora.train.lock import RunLock\n"
    "with RunLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()\n"
)


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {holder.pid} on host "
                                                 rf"{socket.gethostname()}, started .*{LOCK_NAME}"):
            with RunLock(out):
                pass
        # `jaxlora train` takes the lock first: refused before loading anything or writing a file.
        assert main(["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
                     "--output-dir", str(out), "--data.max_seq_len", "16", "--data.batch_size", "2"]) == 2
        assert f"in use by another run (pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused runs wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (out / LOCK_NAME).exists()  # released on exit
    with RunLock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] != holder.pid


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=rf"stale lock .* pid {dead.pid} on host"):
        with RunLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["pid"] == lock.me["pid"]
            with RunLock(tmp_path):  # re-entrant: the CLI holds it around train(), which takes it again
                pass
            assert lock.path.exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_not_guessed_stale_and_errors_release_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunLockedError, match="pid 1 on host elsewhere.*delete the lock file"):
        with RunLock(tmp_path):
            pass
    (tmp_path / LOCK_NAME).unlink()
    with pytest.raises(KeyError):
        with RunLock(tmp_path):
            raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
