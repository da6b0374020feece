"""File helpers: input resolution and crash-safe directory writes."""
import contextlib
import errno
import glob
import os
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from utils.errors import UserError

# The data contract: string columns prompt and response (other columns are carried along).
TEXT_COLUMNS = ("prompt", "response")
MESSAGES = "messages"  # conversations: a list of {role, content} turns (model/conversations.py)


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
                        f"the data needs string columns {', '.join(columns)}")
    for c in columns:
        kind = schema.field(c).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"column {c} of {path} is {kind}, not string: {', '.join(columns)} must be strings")
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
            if os.path.isdir(m):
                raise UserError(f"{m} is a directory; give parquet files, a list or a glob ('{m}/*.parquet')")
            if not os.path.isfile(m):
                raise UserError(f"file {m} not found; check the path")
            files.append(m)
    return files


def has_usable_row(pf: pq.ParquetFile, columns=TEXT_COLUMNS) -> bool:
    """Whether any row has every text column non-empty; reads only until it finds one."""
    for batch in pf.iter_batches(batch_size=4096, columns=list(columns)):
        keep = None
        for c in columns:
            valid = pc.invert(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(batch.column(c)), ""), True))
            keep = valid if keep is None else pc.and_(keep, valid)
        if pc.any(keep).as_py():
            return True
    return False


def check_data_file(path: str, columns=TEXT_COLUMNS, what: str = "train_file") -> pq.ParquetFile:
    """A readable parquet file with string `columns` and at least one usable row, or a UserError."""
    pf = open_parquet(path, columns)
    if pf.metadata.num_rows == 0:
        raise UserError(f"--{what} {path} has no rows; give a file with {', '.join(columns)} rows")
    if not has_usable_row(pf, columns):
        raise UserError(f"--{what} {path} has no usable row: every row has an empty or null "
                        f"{' or '.join(columns)}; check the file")
    return pf


def refuse_to_replace(path: str, what: str, overwrite: bool) -> None:
    """Every command that writes an output leaves an existing one alone unless --overwrite=True."""
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"--{what}={path} already exists; pass --overwrite=True to replace it, or choose another path")


def probe_writable(path: str, what: str) -> None:
    """Check that directory `path` can be created and written, leaving nothing behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--{what}={path} is a file, not a directory; choose another --{what}")
    created, head = [], os.path.abspath(path)
    while not os.path.exists(head):
        created.append(head)
        head = os.path.dirname(head)
    if not os.path.isdir(head):
        raise UserError(f"--{what}={path} cannot be created: {head} is a file; choose another --{what}")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".chatlm-write-probe-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--{what}={path} is not writable ({err.strerror}); fix its permissions or "
                        f"choose another --{what}") from None
    finally:
        for d in created:  # deepest first: leave the disk as it was
            with contextlib.suppress(OSError):
                os.rmdir(d)


def free_bytes(path: str) -> tuple[int, int]:
    """(device id, bytes free) of the filesystem that holds `path` or would hold it."""
    head = os.path.abspath(path)
    while not os.path.exists(head):
        head = os.path.dirname(head)
    return os.stat(head).st_dev, shutil.disk_usage(head).free


def describe_error(err: BaseException, path: str | None = None) -> str:
    """A short reason for a failed write to `path`: OSError, torch's writer or safetensors.

    Torch's zip writer reports a full disk as "unexpected pos ..." or "file write failed", so
    the free space where `path` lies is asked too.
    """
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC or any(
        s in str(err) for s in ("No space left", "StorageFull", "file write failed"))
    if not full and path is not None:
        with contextlib.suppress(OSError):
            full = free_bytes(path)[1] < (1 << 20)
    if full:
        return "no space left on the device"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory that replaces `path` only once the block completes.

    A crash or a full disk during the write leaves `path` as it was (the old directory
    survives until the new one is complete); the partial temporary directory is removed.
    Any failure to write (OSError, torch's RuntimeError, safetensors' errors) is a UserError.
    """
    path = path.rstrip("/")
    tmp, old = path + ".tmp", path + ".old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as err:
        raise UserError(f"cannot write {path} ({describe_error(err)}); fix the path or its permissions") from None
    try:
        yield tmp
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:  # noqa: BLE001 (every writer has its own error type)
        reason = describe_error(err, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {path}: {reason}; free some space or fix the path "
                        "(what was saved there before is intact)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if os.path.isdir(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise UserError(f"could not put {path} in place ({describe_error(err)})") from None


@contextlib.contextmanager
def atomic_write(path: str):
    """Yield a temporary file name that replaces the file `path` only once the block completes:
    a reader (or a crash) never sees half a file. A failure to write is a UserError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"could not write {path} ({describe_error(err)}); free some space or fix the path") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
