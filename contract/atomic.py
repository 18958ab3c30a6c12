"""Atomic output: every writer builds its directory in a temporary sibling that replaces the target only when complete.

The promise each writer (export, build, quantize) keeps through `staged_dir`:
- A failed or interrupted run leaves nothing behind: no half-written output, no temp sibling, no parent folder it
  made. A run killed outright (SIGKILL, power loss) leaves its temp sibling (`.NAME.xxxxxxxx.partial`), which the
  next run to the same target removes.
- It never deletes what it did not write. An existing target is replaced only when it is an earlier output of the
  same kind, recognised by the marker file (`MARKER`) each writer leaves listing what it wrote, and holds nothing
  else; an empty directory may be used too. Anything else is refused with the reason and what to do.
- It never writes into or over its own input: the target may not be an input, lie inside one, or contain one.
- Two runs writing the same target at once: the second one is refused while the first holds the lock.
- A full disk or a read-only location is an InputError naming the target, not a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from contract.errors import InputError

MARKER = ".edgellm-output.json"  # {"kind": ..., "files": [relative paths]}, written last into every staged output
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_SHOWN = 3  # how many stray names an error message lists


def _entries(directory: Path) -> list[str]:
    """Every file and folder under `directory`, as sorted relative POSIX paths (links are not followed)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def _marker_kind(directory: Path) -> tuple[str | None, set[str]]:
    """(kind, listed files) of `directory`'s marker; (None, set()) when it has none or an unreadable one."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        return str(marker["kind"]), set(marker["files"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None, set()


def _show(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _a(kind: str) -> str:
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def _relation(target: Path, source: Path) -> str | None:
    """How `target` overlaps the input `source` (both resolved), or None when they are apart."""
    if target == source:
        return "is"
    if source in target.parents:
        return "lies inside"
    if target in source.parents:
        return "contains"
    return None


def check_target(final: str | Path, *, kind: str, flag: str, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse `final` unless it is new, an empty directory, or an earlier `kind` output holding only its own files;
    and refuse it when it overlaps one of `inputs`. `flag` names the option in messages ("--engineDir")."""
    final = Path(final)
    where = f"{flag} {final}"
    resolved = final.resolve()
    for source in inputs:
        how = _relation(resolved, Path(source).resolve())
        if how:
            raise InputError(f"{where}: expected a location apart from the input {source}, found that it {how} it; "
                             f"a writer never writes into or over its own input: choose another {flag}")
    if final.is_symlink():
        raise InputError(f"{where}: expected a directory path, found a symbolic link (to {os.readlink(final)}); "
                         f"give the real path")
    if not final.exists():
        parent = next(p for p in final.parents if p.exists())
        if not parent.is_dir():
            raise InputError(f"{where}: expected a path under a directory, found that {parent} is a file; choose "
                             f"another {flag}")
        return
    if not final.is_dir():
        raise InputError(f"{where}: expected a directory to write the {kind} into, found a file; choose another "
                         f"{flag}")
    top = sorted(p.name for p in final.iterdir())  # not a walk: the target may be a typo such as `~`
    if not top:
        return
    found_kind, listed = _marker_kind(final)
    if found_kind is None:
        raise InputError(f"{where}: expected a new or empty directory, or {_a(kind)} written earlier by this command, "
                         f"found a directory holding other files ({_show(top)}); it is left untouched: give {flag} "
                         "a new or empty directory")
    if found_kind != kind:
        raise InputError(f"{where}: expected {_a(kind)} to replace, found {_a(found_kind)}; it is left untouched: "
                         f"choose another {flag}")
    stray = [e for e in _entries(final) if e != MARKER and e not in listed]
    if stray:
        raise InputError(f"{where}: is {_a(kind)} from an earlier run, but it also holds files that run did not write "
                         f"({_show(stray)}); move them out or choose another {flag}")


def stale_siblings(final: Path) -> list[Path]:
    """Temp siblings of `final` that a killed run left: `.NAME.xxxxxxxx.partial` and `.NAME.old`."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\w{{8}}\.partial|old)")
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if pattern.fullmatch(p.name))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_error(e: OSError, final: Path, flag: str) -> InputError:
    """A full disk or an unwritable location as one line naming the target."""
    hint = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "choose a writable location"
    return InputError(f"{flag} {final}: could not write it ({e.strerror or e}); {hint} or choose another {flag}")


def _is_write_error(e: BaseException, inputs: list) -> bool:
    """An OSError from writing the output, not from reading an input (whose reader names its own file)."""
    if not isinstance(e, OSError) or e.errno not in WRITE_ERRNOS:
        return False
    filename = getattr(e, "filename", None)
    return filename is None or not any(_relation(Path(filename).resolve(), Path(s).resolve()) for s in inputs)


def _storage_full(e: BaseException) -> OSError | None:
    """safetensors (Rust) reports a full disk as its own error type; its text carries the OS error."""
    text = str(e)
    if type(e).__name__ == "SafetensorError" and ("No space left" in text or "StorageFull" in text):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


@contextmanager
def _lock(final: Path, flag: str) -> Iterator[None]:
    """An exclusive lock on `.NAME.lock` beside `final`, held for the whole run and removed after it."""
    path = final.with_name(f".{final.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{flag} {final}: another run is writing it now (it holds {path.name}); wait for it to "
                             f"finish or choose another {flag}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed the file between our open and lock: take the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _make_parents(final: Path) -> list[Path]:
    """Create the missing parents of `final`; returns those it created, deepest first."""
    created = []
    for parent in [*reversed(final.parents)]:
        try:
            parent.mkdir()
            created.append(parent)
        except FileExistsError:  # there already, or made this moment by a concurrent run
            pass
    return created[::-1]


@contextmanager
def staged_dir(final: str | Path, *, kind: str, flag: str, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` (see the module docstring for when that is
    allowed), on any error or interrupt it is removed. `kind` names the output ("engine dir"), `flag` the option
    that chose `final`, `inputs` the directories the run reads."""
    final = Path(final)
    inputs = list(inputs)
    check_target(final, kind=kind, flag=flag, inputs=inputs)
    created: list[Path] = []
    tmp = None
    try:
        created = _make_parents(final)
        with _lock(final, flag):
            for stale in stale_siblings(final):
                _remove(stale)
            check_target(final, kind=kind, flag=flag, inputs=inputs)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": _entries(tmp)}, indent=1) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; outputs are shared like any build output
            for path in tmp.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            check_target(final, kind=kind, flag=flag, inputs=inputs)  # nothing of the user's crept in meanwhile
            if final.exists():
                old = final.with_name(f".{final.name}.old")
                final.rename(old)
                tmp.rename(final)
                _remove(old)
            else:
                tmp.rename(final)
            tmp = None
    except BaseException as e:
        if tmp is not None:
            _remove(tmp)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        full = _storage_full(e)
        if full is not None or _is_write_error(e, inputs):
            raise _write_error(full or e, final, flag) from None
        raise


def write_json_atomic(path: str | Path, obj, *, flag: str = "output", inputs: Iterable[str | Path] = ()) -> None:
    """Write `obj` as JSON to a temp sibling and rename it into place, so a failed run leaves no partial file; the
    file may not be (or lie inside) one of `inputs`."""
    path = Path(path)
    for source in inputs:
        how = _relation(path.resolve(), Path(source).resolve())
        if how in ("is", "lies inside"):
            raise InputError(f"{flag} {path}: expected a file apart from the input {source}, found that it {how} it; "
                             f"choose another {flag}")
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=4, ensure_ascii=False) + "\n")
        tmp.chmod(0o644)
        tmp.replace(path)
        tmp = None
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise _write_error(e, path, flag) from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
