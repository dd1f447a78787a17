"""Where pleascc writes: every output path checked before any heavy work, and files that appear whole.

Torch-free, so the command line checks its output paths before it imports
anything heavy; ``pleascc.export`` and ``pleascc.plots`` write through it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from pleascc.passes.errors import PleasccError


def check_writable(path: str, option: str = "-o") -> None:
    """Refuse a file path that cannot be written, naming the cause and ``option``, the flag to change.

    Permission bits do not tell (root passes every check, /proc and /sys refuse
    new files, a file system may be read-only), so a file is created beside it
    and removed.
    """
    fix = f"choose another {option} path"
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise PleasccError(f"cannot write {path}: it is a folder; pass a file path (inside it, say) to {option}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise PleasccError(f"cannot write {path}: {folder} is a file, not a folder; {fix}")
    if not os.path.isdir(folder):
        raise PleasccError(f"cannot write {path}: folder {folder} does not exist; create it or {fix}")
    _check_takes_files(folder, path, fix)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PleasccError(f"cannot write {path}: permission denied (the file is read-only); {fix}")


def check_writable_folder(folder: str, option: str) -> None:
    """Refuse a folder that cannot be written, or made where it does not exist yet (then the nearest folder
    above it that exists must take new files)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PleasccError(f"cannot write into {folder}: {existing} is a file, not a folder; choose another "
                           f"{option} folder")
    _check_takes_files(existing, folder, f"choose another {option} folder")


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call ``write`` on a temporary path beside ``path``, then move the file into place: an error or Ctrl-C
    leaves no partial file.  ``write`` creates the file itself, so it has the user's umask, as the ONNX file."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path)), prefix=".pleascc-") as folder:
        tmp = os.path.join(folder, os.path.basename(path))
        write(tmp)
        os.replace(tmp, path)


def beside(path: str, suffix: str) -> str:
    """The file written beside ``path`` with another suffix (report.json -> report.png, merged.pt -> merged.pt2)."""
    return os.path.splitext(path)[0] + suffix


def _check_takes_files(folder: str, target: str, fix: str) -> None:
    """Create a file in ``folder`` and remove it: the one test of writing that permission bits cannot fool."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pleascc-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise PleasccError(f"cannot write {target}: {folder} takes no new files ({_reason(exc)}); {fix}") from None


def _reason(exc: OSError) -> str:
    """An OSError's reason in lower case ("permission denied"), to embed in a sentence."""
    reason = exc.strerror or type(exc).__name__
    return reason[0].lower() + reason[1:]
