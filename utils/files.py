"""File helpers: input resolution and crash-safe directory writes."""
import contextlib
import errno
import glob
import os
import shutil

from utils.errors import UserError


def expand_files(spec: str | list[str]) -> list[str]:
    """A path, a glob or a list of either -> existing files, in a stable order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files = []
    for s in specs:
        matches = sorted(glob.glob(s)) if glob.has_magic(s) else [s]
        if not matches:
            raise UserError(f"no file matches {s!r}; check the path or the glob")
        for m in matches:
            if not os.path.isfile(m):
                raise UserError(f"file {m} not found; check the path")
            files.append(m)
    return files


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory that replaces `path` only once the block completes.

    A crash or a full disk during the write leaves `path` as it was (the old directory
    survives until the new one is complete); the partial temporary directory is removed.
    """
    path = path.rstrip("/")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device while writing {path}; free some space "
                            f"(what was saved before is intact)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
