"""Two runs writing to one out-dir: the second is refused clearly; a dead holder leaves no stale lock."""

import subprocess
import sys

import pytest

from qwen_identity.core.errors import UserInputError
from qwen_identity.core.files.out_dir_lock import OutDirLock


def test_second_writer_is_refused_and_first_release_frees(tmp_path):
    with OutDirLock(tmp_path / "out"):
        with pytest.raises(UserInputError, match=r"another qwen-identity run \(pid \d+\) is writing"):
            OutDirLock(tmp_path / "out").acquire()
    with OutDirLock(tmp_path / "out"):
        pass


def test_lock_held_by_another_process_and_freed_when_it_dies(tmp_path, cli_env):
    code = ("import sys, time\nfrom qwen_identity.core.files.out_dir_lock import OutDirLock\n"
            f"l = OutDirLock({str(tmp_path / 'out')!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match=str(proc.pid)):
            OutDirLock(tmp_path / "out").acquire()
    finally:
        proc.kill()
        proc.wait()
    with OutDirLock(tmp_path / "out"):  # killed holder: the OS dropped its lock
        pass


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        OutDirLock(tmp_path / "f").acquire()
