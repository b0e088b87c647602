"""The result store: permissions from the umask, strict JSON, a per-folder lock, checked npz
loading, orphan cleanup, and the path checks done before any compute (no JAX compiles)."""

import contextlib
import json
import os
import stat

import numpy as np
import pytest

from conservation._experiments.store import (
    CorruptFile,
    UserError,
    atomic_write,
    current_umask,
    folder_lock,
    load_npz,
    prepare_output,
    read_config_text,
    remove_orphans,
    save_npz,
    write_json,
)


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_allows(tmp_path, mask, mode):
    with umask(mask):
        assert current_umask() == mask
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        write_json(tmp_path / "a.json", {"x": 1})
        save_npz(tmp_path / "a.npz", {"x": np.arange(3.0)})
    for name in ("a.bin", "a.json", "a.npz"):
        assert _mode(tmp_path / name) == mode, name


def test_json_is_strict_nonfinite_become_null(tmp_path):
    write_json(tmp_path / "s.json", {"loss": float("nan"), "drift": [np.inf, -np.inf, 1.5],
                                     "steps": np.int64(3), "x": np.float64(2.0)})
    text = (tmp_path / "s.json").read_text()
    data = json.loads(text, parse_constant=_no_constants)
    assert data == {"loss": None, "drift": [None, None, 1.5], "steps": 3, "x": 2.0}


def test_a_corrupted_npz_is_named(tmp_path):
    path = tmp_path / "3.npz"
    save_npz(path, {"loss": np.linspace(0, 1, 500), "status": np.asarray(0)})
    assert set(load_npz(path)) == {"loss", "status"}
    path.write_bytes(path.read_bytes()[:200])  # a killed copy / full disk
    with pytest.raises(CorruptFile, match="3.npz is corrupted"):
        load_npz(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptFile, match="3.npz"):
        load_npz(path)


def test_orphaned_temporaries_are_removed(tmp_path):
    (tmp_path / "points").mkdir()
    orphans = [tmp_path / ".summary.json.abc.tmp", tmp_path / "points" / ".4.npz.x1.tmp"]
    for path in orphans:
        path.write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours: not hidden")
    assert sorted(remove_orphans(tmp_path)) == sorted(orphans)
    assert not any(p.exists() for p in orphans) and (tmp_path / "keep.tmp").exists()


def test_the_folder_lock_excludes_a_second_holder(tmp_path):
    with folder_lock(tmp_path):
        # flock locks belong to an open file, so a second open in this process contends too.
        with pytest.raises(UserError, match="in use by another conservation process"):
            with folder_lock(tmp_path, wait=False):
                pass
    with folder_lock(tmp_path, wait=False):  # released on exit
        pass


def test_output_folder_checks(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_output(a_file)
    with pytest.raises(UserError, match="lies under the file"):
        prepare_output(a_file / "sub" / "out")
    assert prepare_output(tmp_path / "new" / "out").is_dir()
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="is not writable"):
            prepare_output(locked / "out")


def test_config_file_checks(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        read_config_text(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_config_text(tmp_path / "missing.toml")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbfname = 'x'\n")
    with pytest.raises(UserError, match="byte-order mark"):
        read_config_text(bom)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("name = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_config_text(latin)


def test_a_ctrl_c_swallowed_by_a_finaliser_is_raised_at_the_next_check(capsys):
    import signal

    from conservation._experiments.store import check_interrupted, interrupt_guard

    class Finaliser:  # like JAX's gc callback: Python ignores exceptions raised in __del__
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    with interrupt_guard():
        Finaliser()
        with pytest.raises(KeyboardInterrupt):
            check_interrupted()
    check_interrupted()  # cleared on exit
    assert "Exception ignored" not in capsys.readouterr().err


def test_a_full_disk_is_a_user_error_naming_the_file_and_leaves_no_temporary(tmp_path):
    import errno

    from conservation._experiments.store import WriteError

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError) as error:
        atomic_write(tmp_path / "0-gd.npz", full)
    assert isinstance(error.value, WriteError)
    message = str(error.value)
    assert str(tmp_path / "0-gd.npz") in message and "No space left" in message
    assert "free some space" in message and "resume" in message
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary
    # A name the file system cannot hold: named as such before anything is written.
    with pytest.raises(UserError, match="255-byte limit"):
        prepare_output(tmp_path / ("x" * 300))


def test_sigterm_is_handled_like_ctrl_c(capsys):
    import signal

    from conservation._experiments.store import Terminated, check_interrupted, interrupt_guard

    with interrupt_guard():
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        with pytest.raises(Terminated):  # recorded: raised again at the next check
            check_interrupted()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert issubclass(Terminated, KeyboardInterrupt)

