"""Staged outputs: the one way every command writes a directory (compress, export, index build/add/rm).

``with staged_output(out, inputs=[...], overwrite=..., artifact=...) as tmp:`` — write everything into
``tmp``; the directory appears at ``out`` only when the block completes (DESIGN.md §2). The helper:

- refuses an output that is, contains or lies inside any input (after resolving links), an existing output
  that is not a directory, an existing output without ``overwrite``, and — with ``overwrite`` — an existing
  output that is not the same kind of artifact (it never deletes a folder dsedge did not write);
- holds an exclusive lock on the output (``flock`` on the sibling ``.NAME.lock``, which holds the pid): a
  second writer of the same output is refused with a UserError naming the holder. The lock is re-entrant in
  one process, so ``index add`` holds it across its whole read-modify-write (:func:`output_lock`);
- writes into ``.NAME.partial-PID-RANDOM`` next to the output and renames it in when complete; an existing
  output (``overwrite``) moves aside to ``.NAME.old-PID-RANDOM`` only after the new one is complete, and is
  removed after the new one is in place;
- turns SIGTERM and SIGHUP into :class:`dsedge.errors.Terminated` while the output is open, so the partial
  directory is removed as on Ctrl-C (exit 128 + signal number: 143, 129), then restores the old handlers;
- removes what a killed run (SIGKILL, power loss) left: partial directories whose pid is no longer alive,
  and an ``.old-`` directory (put back if the output itself is missing: it is then the only copy).

Stdlib only (the torch-free runtime may use it). A test hook, ``DSEDGE_TEST_PAUSE_BEFORE_COMMIT=FILE``,
makes a writer announce itself in ``FILE.waiting`` (its pid and partial directory) and wait until ``FILE``
exists before renaming its output in: tests use it to catch a writer mid-way without guessing with sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dsedge.errors import Terminated, UserError

log = logging.getLogger(__name__)

PAUSE_ENV = "DSEDGE_TEST_PAUSE_BEFORE_COMMIT"
PAUSE_LIMIT_S = 120.0  # a forgotten test hook never hangs a run for longer than this
TERMINATING_SIGNALS = ("SIGTERM", "SIGHUP")


@dataclass(frozen=True)
class Artifact:
    """What a command writes: ``name`` for messages, ``recognize(dir)`` true for a directory of this kind
    (only such a directory, or an empty one, is replaced by ``overwrite``)."""

    name: str
    recognize: Callable[[Path], bool]


def has_file(*names: str) -> Callable[[Path], bool]:
    """A recognizer: every one of ``names`` is a file in the directory."""
    return lambda root: all((root / name).is_file() for name in names)


# --- checks --------------------------------------------------------------------------------------------

def real_path(path: str | Path) -> Path:
    """The absolute path with every symlink resolved (the path need not exist)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def check_output(output: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 artifact: Artifact | None = None) -> Path:
    """Refuse ``output`` before any work is done (see the module doc); returns its real path.

    Call it early to fail fast; :func:`staged_output` calls it again under the lock."""
    out = real_path(output)
    for source in inputs:
        _check_apart(out, real_path(source), shown=output)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError("output exists and is not a directory", where=str(output),
                            hint="choose another -o path (dsedge writes a directory there)")
        if not overwrite:
            raise UserError("output already exists", where=str(output), hint="pass --overwrite to replace it")
        if artifact is not None and any(out.iterdir()) and not artifact.recognize(out):
            raise UserError(f"output exists and is not a {artifact.name}; --overwrite replaces only a "
                            f"{artifact.name} written by dsedge (or an empty directory)", where=str(output),
                            hint="choose another -o directory, or empty/remove this one yourself if you mean it")
    return out


def _check_apart(out: Path, source: Path, *, shown) -> None:
    """The output must not be an input, hold one, or lie inside one: replacing it would destroy the input."""
    if out == source:
        relation = "is the input"
    elif source in out.parents:
        relation = "lies inside the input"
    elif out in source.parents:
        relation = "contains the input"
    else:
        return
    raise UserError(f"output {relation} {source}", where=str(shown),
                    hint="choose an -o directory outside every input (writing there would destroy the input)")


# --- the lock --------------------------------------------------------------------------------------------

_held: dict[Path, tuple[int, int]] = {}  # real output path -> (lock fd, depth) held by this process
_held_guard = threading.Lock()
_open_partials: set[Path] = set()  # partial directories this process is writing now


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(output: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock on ``output`` (re-entrant in this process); yields the output's real path.

    A writer already holding it makes this raise a UserError naming its pid. The lock file is removed on
    release; an acquirer checks that the file it locked is still the one at the path (else it retries), so
    removing it never lets two writers in."""
    out = real_path(output)
    with _held_guard:
        if out in _held:
            fd, depth = _held[out]
            _held[out] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield out
        finally:
            with _held_guard:
                fd, depth = _held[out]
                _held[out] = (fd, depth - 1)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_path(out), shown=output)
    with _held_guard:
        _held[out] = (fd, 1)
    try:
        yield out
    finally:
        with _held_guard:
            del _held[out]
        _release(lock_path(out), fd)


def _acquire(path: Path, *, shown) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _holder(path)
            raise UserError(f"another dsedge process ({holder}) is writing this output", where=str(shown),
                            hint="wait for it to finish, or stop it; then run again") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(path: Path) -> str:
    """'pid N' from the lock file (the holder writes it right after locking: retry an empty read briefly)."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text.isdigit():
                return f"pid {text}"
        time.sleep(0.01)
    return "pid unknown"


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        if _same_file(fd, path):
            path.unlink()
    os.close(fd)  # closing drops the flock


# --- termination signals ----------------------------------------------------------------------------

def _raise_terminated(signum, _frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """While open, SIGTERM/SIGHUP raise :class:`Terminated` (cleanup runs as for Ctrl-C). Only the main thread
    can install handlers; a signal the process ignores (``nohup``) stays ignored."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in TERMINATING_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
                previous[number] = signal.signal(number, _raise_terminated)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# --- leftovers of killed runs ----------------------------------------------------------------------

def _sibling_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)-[0-9a-f]+$")


def _in_use(entry: Path, pid: int) -> bool:
    if pid == os.getpid():  # ours (or a dead run's pid reused by us): in use only if open right now
        return entry in _open_partials
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the partial/old siblings of ``out`` left by dead processes; put an old output back if the
    output is missing (the run died between moving it aside and renaming the new one in). Call with the
    output's lock held. Returns what was removed or restored."""
    if not out.parent.is_dir():
        return []
    pattern = _sibling_pattern(out)
    found = []
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match:
            continue
        kind, pid = match.group(1), int(match.group(2))
        if _in_use(entry, pid):
            log.warning("leaving %s: it belongs to running process %d", entry, pid)
            continue
        if kind == "old" and not (out.exists() or out.is_symlink()):
            log.warning("restoring %s from %s (a run was killed while replacing it)", out, entry.name)
            os.rename(entry, out)
        else:
            log.info("removing %s (left by process %d, no longer running)", entry, pid)
            _remove(entry)
        found.append(entry)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- the staged output --------------------------------------------------------------------------------

def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def staged_output(output: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                  artifact: Artifact | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling directory of ``output``; it becomes ``output`` when the block
    completes, and is removed on any error, Ctrl-C, SIGTERM or SIGHUP (see the module doc)."""
    inputs = list(inputs)
    check_output(output, inputs=inputs, overwrite=overwrite, artifact=artifact)
    with output_lock(output) as out:
        clean_leftovers(out)
        check_output(output, inputs=inputs, overwrite=overwrite, artifact=artifact)  # again, under the lock
        with termination_raises():
            tmp = _sibling(out, "partial")
            tmp.mkdir()
            _open_partials.add(tmp)
            try:
                yield tmp
                _pause_for_tests(tmp)
                _commit(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                _open_partials.discard(tmp)


def _commit(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an existing ``out`` goes aside first and is removed once ``tmp`` is in."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old = _sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # the new one could not go in: keep the old one
        raise
    _remove(old)


def _pause_for_tests(tmp: Path) -> None:
    gate = os.environ.get(PAUSE_ENV)
    if not gate:
        return
    note = Path(gate + ".waiting")
    note.with_name(note.name + ".tmp").write_text(f"{os.getpid()}\n{tmp}\n")
    os.replace(note.with_name(note.name + ".tmp"), note)  # whole, never half-written, when a test reads it
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
