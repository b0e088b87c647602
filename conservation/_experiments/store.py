"""Result files: atomic writes that honour the umask, strict JSON, a per-folder lock, checked
npz loading, and the user-facing checks run before any compute.

Every file is written to a hidden temporary sibling (`.<name>.<random>.tmp`) and renamed over
the target, so a reader never sees half a file. `tempfile.mkstemp` creates 0600 files; we
chmod them to `0o666 & ~umask`, the permissions `open()` would have given. A process that
holds `FolderLock` on a folder owns it: it removes orphaned temporaries (a killed writer's),
and a second process on the same folder waits for it instead of computing the same results
again. Independent workers sharing a folder claim the items they compute (`Claims`).
"""

import contextlib
import errno
import fcntl
import io
import json
import math
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator

import numpy as np


class UserError(Exception):
    """A problem the user can fix (a path, a folder's contents): one line, exit status 2."""


class CorruptFile(UserError):
    """A result file that cannot be read back (truncated or damaged); `fix` says what works
    (for a result file: rerunning recomputes it; for a folder's manifest it does not)."""

    def __init__(self, path, reason: str,
                 fix: str = "delete it or rerun the same command to recompute it"):
        self.path = pathlib.Path(path)
        self.reason = reason
        super().__init__(f"{self.path} is corrupted ({reason}); {fix}.")


class WriteError(UserError):
    """A result file that cannot be written (disk full, quota, name too long, read-only): names
    the file and the fix. Finished results stay on disk; the same command resumes."""

    def __init__(self, path, error: OSError):
        self.path = pathlib.Path(path)
        reason = error.strerror or type(error).__name__
        code = error.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = ("free some space, then rerun the same command to resume (finished results "
                   "are kept), or choose another `--out` on a disk with room")
        elif code == errno.ENAMETOOLONG:
            fix = ("the name is too long for the file system: choose a shorter `--out` (or "
                   "config `name`, `output`, `label`)")
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "the folder is not writable: choose another `--out`"
        else:
            fix = ("check the file system, then rerun the same command to resume (finished "
                   "results are kept), or choose another `--out`")
        super().__init__(f"cannot write {self.path} ({reason}); {fix}.")


# The longest file or folder name (bytes) the common file systems take (ext4, XFS, btrfs,
# APFS, ZFS: 255); longer ones fail with ENAMETOOLONG only when written.
NAME_MAX = 255
PATH_MAX = 4095


def path_problem(path) -> str | None:
    """Why `path` cannot be a file-system path (a NUL byte, a component over `NAME_MAX` bytes,
    the whole over `PATH_MAX`), or None."""
    text = str(path)
    if "\0" in text:
        return "it contains a NUL byte"
    for part in pathlib.PurePath(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            return (f"its component {part[:40]!r}… is {len(os.fsencode(part))} bytes long, over "
                    f"the {NAME_MAX}-byte limit of file names")
    if len(os.fsencode(text)) > PATH_MAX:
        return f"it is {len(os.fsencode(text))} bytes long, over the {PATH_MAX}-byte path limit"
    return None


LOCK_NAME = ".conservation.lock"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: restore at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write `path` by calling `write(binary_file)` on a temporary sibling, then renaming it
    over `path` (readers never see a partial file). The file gets `0o666 & ~umask`."""
    path = pathlib.Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # the disk's fault, not ours
            raise WriteError(path, e) from None
        raise


def fingerprint(obj) -> str:
    """A short stable digest of a JSON-able object (a resolved config), recorded in result
    files so that a file copied from another run or folder is recognised as foreign."""
    import hashlib

    text = json.dumps(jsonable(obj), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity(arrays: dict) -> dict | None:
    """The identity record `arrays["identity"]` (JSON text) of a stored result, or None."""
    if "identity" not in arrays:
        return None
    try:
        value = json.loads(str(arrays["identity"]))
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def identity_array(record: dict) -> np.ndarray:
    """`record` as the 0-d string array stored under "identity" (see `identity`)."""
    return np.asarray(json.dumps(jsonable(record), sort_keys=True, allow_nan=False))


def jsonable(obj):
    """`obj` with numpy scalars/arrays made Python and non-finite floats replaced by `None`
    (strict JSON has no NaN or Infinity; the statuses next to such values say why)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj) -> str:
    """Strict JSON text of `obj` (see `jsonable`)."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


def write_json(path, obj) -> None:
    text = strict_json(obj).encode()
    atomic_write(path, lambda f: f.write(text))


def read_json(path, *, fix: str | None = None) -> dict:
    """A JSON object file we wrote; a damaged one is a `CorruptFile` naming it (with `fix`,
    what to do, when rerunning would not recompute it)."""
    path = pathlib.Path(path)
    extra = {} if fix is None else {"fix": fix}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(path, f"not valid JSON: {e}", **extra) from None
    if not isinstance(data, dict):
        raise CorruptFile(path, f"a JSON {type(data).__name__}, not an object", **extra)
    return data


def save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_npz(path) -> dict[str, np.ndarray]:
    """Every array of an npz file, read eagerly (so the zip CRCs are checked).

    **Raises:** `CorruptFile` naming `path` if it is truncated or damaged."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
            zipfile.LargeZipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptFile(path, f"{type(e).__name__}: {e}") from None


def is_readable_npz(path) -> bool:
    try:
        load_npz(path)
    except (CorruptFile, FileNotFoundError):
        return False
    return True


def remove_orphans(folder, *, min_age: float = 0.0) -> list[pathlib.Path]:
    """Delete temporaries (`.*.tmp`) left in `folder` (and its subfolders one level down)
    by a killed write. Call only while holding the folder's `FolderLock`. `min_age` > 0
    (independent workers share the folder, see `Claims`) spares temporaries modified in the
    last `min_age` seconds: a live worker may be writing them."""
    folder = pathlib.Path(folder)
    removed = []
    now = time.time()
    for pattern in (".*.tmp", "*/.*.tmp"):
        for path in folder.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                if min_age and now - path.stat().st_mtime < min_age:
                    continue
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def folder_lock(folder, *, wait: bool = True,
                log: Callable[[str], None] = lambda _: None) -> Iterator[None]:
    """Hold an advisory lock (`fcntl.flock`) on `folder` for the block: a second process on
    the same folder waits (`wait=True`, with one message) or gets a `UserError`. The lock dies
    with its process, so a killed run never leaves the folder locked."""
    folder = pathlib.Path(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if not wait:
                raise UserError(f"{folder} is in use by another conservation process "
                                f"(pid {owner}); wait for it or choose another `--out`.") from None
            log(f"waiting for another conservation process (pid {owner}) using {folder} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_output(path, *, option: str = "--out") -> pathlib.Path:
    """Check, before any compute, that results can be written to folder `path`, and create
    it. **Raises:** `UserError` naming the path if it is a file, lies under a file, or is not
    writable."""
    path = pathlib.Path(path)
    problem = path_problem(path)
    if problem is not None:
        raise UserError(f"`{option}` {str(path)[:80]!r} cannot be a folder: {problem}; choose a "
                        "shorter path.")
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"`{option}` {path} is a file, not a folder; choose a folder.")
        ancestor = path
        while not ancestor.exists():
            if ancestor.parent == ancestor:
                break
            ancestor = ancestor.parent
    except OSError as e:  # e.g. ENAMETOOLONG on a file system with a lower limit
        raise UserError(f"`{option}` {path} cannot be used ({e.strerror}); choose another "
                        "folder.") from None
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"`{option}` {path} lies under the file {ancestor}; choose a folder "
                        "whose parents are folders.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"`{option}` {path} is not writable ({ancestor} does not permit it); "
                        "choose another folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A probe write: access() is not the whole story (read-only mounts, ACLs).
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"`{option}` {path} is not writable ({e.strerror}); choose another "
                        "folder.") from None
    return path


def read_config_text(path) -> str:
    """The text of a config file, checked: a file (not a folder), UTF-8, no byte-order mark.

    **Raises:** `UserError` naming the path."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"config {path} is a folder; give the path of a .toml file.")
    if not path.exists():
        raise UserError(f"config file {path} does not exist.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"config {path} cannot be read ({e.strerror}).") from None
    if data.startswith(b"\xef\xbb\xbf"):
        raise UserError(f"config {path} starts with a UTF-8 byte-order mark, which TOML does "
                        "not allow; save it as UTF-8 without BOM.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not UTF-8 text (byte {e.start}); save it as "
                        "UTF-8.") from None


_INTERRUPTED = threading.Event()
_SIGNAL = [0]  # the signal number of the recorded interrupt


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop request), handled like Ctrl-C: finished results
    are kept and the same command resumes. The CLI exits with 143 (128 + SIGTERM)."""

    signum = 15


def _interrupt(signum: int) -> KeyboardInterrupt:
    import signal

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame):
    _SIGNAL[0] = signum
    _INTERRUPTED.set()
    raise _interrupt(signum)


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """Make Ctrl-C (SIGINT) and SIGTERM stick: Python drops a KeyboardInterrupt raised inside a
    garbage-collector callback or `__del__` (JAX runs some), so the handler also records it,
    and `check_interrupted` (called between entries and batches) raises it again. SIGTERM
    raises `Terminated`, a KeyboardInterrupt."""
    import signal

    _INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook

    def quiet_interrupts(unraisable):  # recorded above: no "Exception ignored" traceback
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)

    sys.unraisablehook = quiet_interrupts
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
        _INTERRUPTED.clear()


def check_interrupted() -> None:
    """Raise `KeyboardInterrupt` (`Terminated` for SIGTERM) if Ctrl-C was pressed or SIGTERM
    received (see `interrupt_guard`)."""
    if _INTERRUPTED.is_set():
        raise _interrupt(_SIGNAL[0])


# Claims: independent workers sharing one folder ----------------------------------------------

CLAIMS = "claims"
CLAIM_TTL = 300.0  # seconds a worker on another machine stays alive without a heartbeat


def _machine() -> dict:
    """What makes a pid meaningful: the host name, the kernel's boot id and the pid namespace
    (two containers on one kernel, or two hosts of one name, are different machines)."""
    try:
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "boot": boot, "pidns": namespace}


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell a reused pid."""
    fields = _process_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` of this machine runs: not ended, not a zombie (killed, not yet
    reaped) and, where `start` is known, not a new process that reuses the pid."""
    if pid <= 0:  # 0 and negatives name process groups, never a worker
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    fields = _process_stat(pid)
    if fields:
        if fields[0] in ("Z", "X"):
            return False
        if start is not None and len(fields) > 19 and fields[19] != start:
            return False
    return True


class Claims:
    """Claims on the items (sweep points) of a folder shared by independent processes
    ("workers": a SLURM array, submitit jobs, a shell loop), so that no two compute the same
    item and a dead worker's items pass to the next one.

    **Files** (in `folder/claims/`): `<item>.claim` is created with `O_CREAT | O_EXCL`
    (atomic, NFS v3+ included): whoever creates it owns the item. It records the worker
    (`token`), its machine (host name, boot id, pid namespace), pid and the pid's start time.
    `<token>.worker` is the worker's heartbeat: an expiry time `ttl` seconds ahead, rewritten
    every `ttl / 10` seconds by a daemon thread while the worker is registered.

    **Dead workers.** A claim is stale when its worker runs on this machine and its pid has
    ended (or is a zombie, or was reused): at once; or, on another machine, when its heartbeat
    has expired or its worker file is gone (clocks must agree to well within `ttl`). A stale
    claim is taken over under a short lock (`claims/.conservation.lock`) after checking again,
    so two takers never both win. The owner releases a claim (deletes it) only after writing
    the item's result: a worker that claims an item then checks that its result is still
    missing. A live worker never loses a claim, except one that stops beating for `ttl`
    seconds on another machine (then the item may be computed twice, to the same numbers).
    """

    def __init__(self, folder, *, ttl: float = CLAIM_TTL):
        self.dir = pathlib.Path(folder) / CLAIMS
        self.ttl = float(ttl)
        self._machine = _machine()
        pid = os.getpid()
        token = f"{self._machine['host']}-{pid}-{os.urandom(4).hex()}"
        self.token = "".join(c if c.isalnum() or c in "-_." else "_" for c in token)[-120:]
        self.record = {"worker": self.token, **self._machine, "pid": pid,
                       "start": _process_start(pid)}
        self.held: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- this worker ----------------------------------------------------------------------
    def register(self) -> None:
        """Create the folder, write the heartbeat and keep it beating (a daemon thread)."""
        self.dir.mkdir(exist_ok=True)
        self._beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="conservation-claims-heartbeat")
        self._thread.start()

    def close(self) -> None:
        """Release every claim still held (its item unfinished: the next worker takes it) and
        remove the heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for name in list(self.held):
            self.release(name)
        self._worker_path(self.token).unlink(missing_ok=True)

    def __enter__(self) -> "Claims":
        self.register()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _worker_path(self, token: str) -> pathlib.Path:
        return self.dir / f"{token}.worker"

    def _path(self, name: str) -> pathlib.Path:
        return self.dir / f"{name}.claim"

    def _beat(self) -> None:
        write_json(self._worker_path(self.token),
                   self.record | {"expires": time.time() + self.ttl, "ttl": self.ttl})

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 10):
            with contextlib.suppress(OSError, UserError):  # a missed beat; the next may work
                self._beat()

    # -- items ------------------------------------------------------------------------------
    def claim(self, name: str) -> bool:
        """Claim item `name`; False if another worker holds it (live or dead)."""
        path = self._path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
        except FileExistsError:
            return False
        except OSError as e:
            raise WriteError(path, e) from None
        try:
            os.write(fd, json.dumps(self.record).encode())
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise WriteError(path, e) from None
        os.close(fd)
        self.held.add(name)
        return True

    def release(self, name: str) -> None:
        """Give up item `name` (after writing its result, or unfinished)."""
        self.held.discard(name)
        if (self.owner(name) or {}).get("worker") == self.token:  # never another's claim
            self._path(name).unlink(missing_ok=True)

    def owner(self, name: str) -> dict | None:
        """The record of item `name`'s claim; None if unclaimed, {} while being written."""
        try:
            text = self._path(name).read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}

    def claimed(self) -> set[str]:
        """The items claimed now (by anyone)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return set()
        return {n[:-len(".claim")] for n in names if n.endswith(".claim")}

    def is_stale(self, name: str) -> bool:
        """Whether item `name` is claimed by a worker that has died."""
        path = self._path(name)
        try:
            record = self.owner(name)
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        if record is None:
            return False
        if not record.get("worker"):  # being written (or damaged): give it `ttl`
            return age > self.ttl
        return not self._alive(record)

    def take_over(self, name: str) -> bool:
        """Claim item `name` from a dead worker (see `is_stale`); False if it is alive, or
        another worker was faster."""
        with folder_lock(self.dir):
            if not self.is_stale(name):
                return False
            self._path(name).unlink(missing_ok=True)
            return self.claim(name)

    # -- workers ----------------------------------------------------------------------------
    def _alive(self, record: dict, beat: dict | None = None) -> bool:
        """Whether the worker of `record` (a claim's, or its heartbeat `beat`) is alive."""
        if record.get("worker") == self.token:
            return True
        if all(record.get(k) == self._machine[k] for k in ("host", "boot", "pidns")):
            try:
                return pid_alive(int(record["pid"]), record.get("start"))
            except (KeyError, ValueError, TypeError):
                return False
        try:  # another machine: its heartbeat
            if beat is None:
                beat = json.loads(self._worker_path(str(record["worker"])).read_text())
            return time.time() < float(beat["expires"])
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError):  # being rewritten: look again later
            return True

    def others_alive(self) -> bool:
        """Whether another registered worker is alive."""
        try:
            paths = list(self.dir.glob("*.worker"))
        except OSError:
            return False
        for path in paths:
            try:
                record = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except ValueError:
                return True
            if isinstance(record, dict) and record.get("worker") != self.token \
                    and self._alive(record, record):
                return True
        return False

    def tidy(self) -> None:
        """Remove dead workers' claims and heartbeats, and the folder when no claim is left
        and no other worker is alive. Call while holding the shared folder's lock (workers
        register under it, so none appears meanwhile)."""
        for name in self.claimed():
            if self.is_stale(name):
                self._path(name).unlink(missing_ok=True)
        for path in self.dir.glob("*.worker"):
            with contextlib.suppress(FileNotFoundError, ValueError, OSError):
                record = json.loads(path.read_text())
                if isinstance(record, dict) and not self._alive(record, record):
                    path.unlink()
        if not self.others_alive() and not self.claimed():
            for path in (self.dir / LOCK_NAME, *self.dir.glob(".*.tmp")):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()
