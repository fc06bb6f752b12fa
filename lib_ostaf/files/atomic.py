"""Atomic file writes: temp file + fsync + rename, existing files refused unless overwritten."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from lib_ostaf.errors import AdapterFileError, InputError


def current_umask() -> int:
    # os.umask() would have to set it temporarily (racy in a threaded WebUI); read it instead
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def refuse_existing_path(path: Path) -> None:
    if _exists(path):
        raise InputError(
            f"{path} already exists; choose another name or enable overwrite. Nothing was written."
        )


TEMP_SUFFIX = ".tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep its file
    return True


def sweep_stale_temps(path: Path) -> list[Path]:
    """Remove temp files of ``path`` left by a process that was killed (SIGKILL, power
    loss) while writing: ``.<name>.<pid>.*.tmp`` whose pid is no longer running."""
    removed = []
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            if not (p.name.startswith(prefix) and p.name.endswith(TEMP_SUFFIX)):
                continue
            pid = p.name[len(prefix) :].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def atomic_write(path: str | Path, data: bytes, *, overwrite: bool) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    Existing files are refused (InputError) unless ``overwrite``; without overwrite the final
    step is a hard link, so a file created meanwhile is not clobbered either. The temp file is
    removed on any failure (KeyboardInterrupt included). OS errors become AdapterFileError.
    """
    path = Path(path)
    if not overwrite:
        refuse_existing_path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; cannot write a file there.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterFileError(f"Cannot create folder {path.parent}: {e}") from e

    sweep_stale_temps(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~current_umask())
        if overwrite:
            os.replace(tmp, path)
            tmp = None
        else:
            try:
                os.link(tmp, path)  # atomic "create if absent"
            except FileExistsError:
                refuse_existing_path(path)
                raise
            except OSError:  # filesystem without hard links
                refuse_existing_path(path)
                os.replace(tmp, path)
                tmp = None
    except OSError as e:
        raise AdapterFileError(f"Could not write {path}: {e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
