"""Writing the course's output files safely: whole or not at all, into a folder that can take them.

A run that is killed (Ctrl-C, out of memory, a closed laptop) must never leave half a file that a later run
reads as whole. Everything here is plain Python (no torch), shared by training, evaluation and deployment.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def write_text_atomically(path, text: str) -> Path:
    """Write to a temporary file next to `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    return path


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MB blocks (a checkpoint or an ONNX graph need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def writable_folder_error(folder, option: str) -> str | None:
    """Why `folder` cannot be the output folder (a file, under a file, not writable), or None. Creates nothing:
    the probe file goes into the folder, or into its nearest existing parent, and is gone at once.
    `option` is the command-line option that named the folder, so the message says what to change."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{option} {folder} is a file, not a folder: choose a folder path for {option}"
    ancestor = next((p for p in [folder.absolute(), *folder.absolute().parents] if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        return f"{option} {folder}: {ancestor} is a file, so the folder cannot be created there: choose another {option}"
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        return (f"{option} {folder} is not writable ({err.strerror or err}): choose a folder you can write to, "
                "or fix its permissions")
    return None
