"""File helpers: input resolution and crash-safe directory writes."""
import contextlib
import errno
import glob
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from utils.errors import UserError

# The data contract: string columns prompt and response (other columns are carried along).
TEXT_COLUMNS = ("prompt", "response")


def open_parquet(path: str, columns=TEXT_COLUMNS) -> pq.ParquetFile:
    """Open a parquet file for streaming, checking it exists and has string `columns`."""
    if not os.path.exists(path):
        raise UserError(f"file {path} not found; check the path")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; give a .parquet file")
    try:
        # pre_buffer=False and a 1 MB buffer: read pages as they are needed. pyarrow otherwise
        # buffers whole column chunks ahead and holds what it read until the iteration ends
        # (1.2 GB instead of 0.24 GB on a 2M-row file).
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} is not a readable parquet file ({err}); give a parquet file with string "
                        f"columns {', '.join(TEXT_COLUMNS)}") from None
    schema = pf.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise UserError(f"{path} has no column {', '.join(missing)} (found: {', '.join(schema.names)}); "
                        f"the data needs string columns {', '.join(TEXT_COLUMNS)}")
    for c in columns[:len(TEXT_COLUMNS)]:
        kind = schema.field(c).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"column {c} of {path} is {kind}, not string: prompt and response must be strings")
    return pf


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
