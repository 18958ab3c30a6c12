"""Files a stage reads from a directory the user named must be regular files inside that directory.

A checkpoint, export or engine dir may come from someone else. A symlink in it (`tokenizer.json -> /etc/shadow`), a
shard index naming `../elsewhere.safetensors` or an absolute path, or a FIFO that blocks a reader forever would make
a stage read, or copy into its output, a file the user never handed over. The one exception is the Hugging Face cache
layout, where each file of `snapshots/<revision>/` is a symlink into the repository's `blobs/`.
"""

from __future__ import annotations

import stat
from pathlib import Path, PurePosixPath

from contract.errors import InputError


def _hf_blob(root: Path, real: Path) -> bool:
    """`real` is a blob of the Hugging Face cache repository whose snapshot `root` is."""
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def checked_file(root: str | Path, name: str, what: str, *, required: bool = True) -> Path | None:
    """The path of `root/name` after checking that it resolves to a regular file inside `root` (or its HF cache blob);
    None when it does not exist and is not `required`. `name` is relative (it may come from an index file)."""
    root = Path(root)
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts:
        raise InputError(f"{root}: expected {what} as a file name inside the directory, found {name!r}")
    path = root / name
    if not path.exists() and not path.is_symlink():
        if required:
            raise InputError(f"{path}: expected {what}, found no such file")
        return None
    real_root, real = root.resolve(), path.resolve()
    if not real.is_relative_to(real_root) and not _hf_blob(real_root, real):
        raise InputError(f"{path}: expected {what} inside {root}, found a link to {real} outside it; copy the file "
                         "into the directory if you mean to use it")
    try:
        mode = real.stat().st_mode
    except OSError:
        mode = 0
    if not stat.S_ISREG(mode):
        found = "a directory" if stat.S_ISDIR(mode) else "a link to nothing" if mode == 0 else "a special file"
        raise InputError(f"{path}: expected {what} (a regular file), found {found}")
    return path
