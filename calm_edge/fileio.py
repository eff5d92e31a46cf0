"""Writing files and folders so that a reader never sees them half-written, and no input is lost.

Everything calm-edge produces (tokenizers, token shards, checkpoints, packages) is written
under a temporary name beside its destination and renamed into place once complete. A crash
or an error half-way leaves the previous version, if any, untouched. Three more guarantees live
here, so that every writing command has them without a check of its own:

- an output never is, holds or lies inside one of the command's inputs (`check_apart`), so
  `--force` cannot delete what the command reads;
- one writer at a time per output folder (`output_lock`): a second is refused at once instead
  of one result being silently lost, and the hidden leftovers of a killed writer are removed
  (or, for a folder that was moved aside, put back) before the next one starts;
- an operating-system error (disk full, read-only filesystem, no permission) becomes one
  `CalmEdgeError` naming the path and the cause (`os_error`), with nothing half-written left.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from calm_edge.errors import CalmEdgeError

# What to do about each operating-system error a write can meet.
_FIXES = {
    errno.ENOSPC: "free some space there or choose another --out",
    errno.EDQUOT: "free some space there or choose another --out",
    errno.EROFS: "that filesystem is read-only: choose another --out",
    errno.EACCES: "you may not write there: choose another --out or fix its permissions",
    errno.EPERM: "you may not write there: choose another --out or fix its permissions",
}


def sha256_of(path, block_size=1 << 20):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def os_error(error, path, verb="write", blame_path=False):
    """A `CalmEdgeError` for an `OSError` met while writing `path`: the file, the cause and the fix.

    The file named is the error's own unless `blame_path` (a hidden helper file such as a lock
    would mean nothing to the user).
    """
    where = path if blame_path else (error.filename or path)
    if verb == "read":
        fix = "check that file and its permissions"
    else:
        fix = _FIXES.get(error.errno, "check the path and try again")
    return CalmEdgeError(f"cannot {verb} {where}: {error.strerror or error}; {fix}")


@contextlib.contextmanager
def reporting_os_errors(path, verb="write"):
    """Turn an `OSError` inside the block into `os_error(..., path)`."""
    try:
        yield
    except OSError as e:
        raise os_error(e, path, verb) from None


def out_of_space(path, margin=1 << 20):
    """Whether the filesystem holding `path` has (almost) no space left: after a failed write, the cause."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < margin


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----- outputs apart from inputs ---------------------------------------------------------------


def check_apart(out, inputs, folder=True):
    """Refuse an output that would destroy an input.

    `inputs`: {label: path or [paths]} (label as the user wrote it, e.g. "--calm"); a path that
    does not exist is no one's input and is skipped. A folder output (`folder`) must neither be,
    hold nor lie inside an input, since replacing it deletes everything under it. A file output
    must not be an input, nor replace a file inside an input folder.
    """
    target = Path(out).resolve()
    for label, paths in inputs.items():
        for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths or ()):
            if not path or not os.path.exists(path):
                continue
            source = Path(path).resolve()
            if target == source:
                relation = "is"
            elif folder and source.is_relative_to(target):
                relation = "holds"
            elif source.is_dir() and target.is_relative_to(source) and (folder or target.exists()):
                relation = "lies inside"
            else:
                continue
            raise CalmEdgeError(f"--out {out} {relation} the input {label} {path}; writing it would destroy that "
                                "input: choose an --out outside every input")


def check_writable(out):
    """Refuse, before any work, an output on a read-only filesystem or in a folder one may not write.

    The nearest existing folder on the way to `out` is asked (access(2) reports a read-only
    filesystem even to root); a full disk is found only by writing, and reported then.
    """
    folder = Path(os.path.abspath(out)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only(folder) else errno.EACCES
        raise os_error(OSError(code, os.strerror(code)), folder)


def _read_only(folder):
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


# ----- one writer per output ----------------------------------------------------------------------


def _leftover_pattern(name):
    # tempfile's names: `.NAME.` + 8 characters + suffix; exact, so `.NAME.v2.*` (another output) never matches.
    return re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(partial|old|trash)$")


def _clean_leftovers(out):
    """Remove what a killed writer of `out` left beside it; put back a folder it had moved aside."""
    pattern = _leftover_pattern(out.name)
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if not match:
            continue
        moved_aside = path / out.name
        if match.group(1) == "old" and moved_aside.exists() and not out.exists():
            os.replace(moved_aside, out)  # killed between moving the old folder aside and moving the new one in
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def output_lock(out):
    """Hold `.NAME.lock` beside `out` for the block; a second writer of `out` is refused at once.

    The lock is `flock`'s, so the kernel releases it when a holder dies: a killed command never
    leaves `out` locked. Holding it, the leftovers of earlier killed writers are cleaned up.
    """
    out = Path(out)
    lock_path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock_path, out)
    except OSError as e:
        raise os_error(e, out, blame_path=True) from None
    try:
        with reporting_os_errors(out):
            _clean_leftovers(out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def _lock(lock_path, out):
    """An open descriptor of `lock_path` holding its exclusive lock, or a CalmEdgeError if it is held."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CalmEdgeError(f"{out} is being written by another calm-edge command right now; wait for it "
                                "to finish, or choose another --out") from None
        # The previous holder removes the file as it lets go; a lock on a removed file locks nothing.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


# ----- the write primitives ---------------------------------------------------------------------


def write_bytes_atomic(path, data: bytes):
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    with reporting_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_json_atomic(path, obj):
    """Write `obj` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_output_dir(out, force=False, what="output", inputs=None):
    """Yield a temporary folder to fill; on success it replaces `out` in one rename.

    `inputs` ({label: path}, see `check_apart`) are what the command reads: `out` must be apart
    from them. If `out` already exists, refuse unless `force`. Only one writer of `out` at a
    time (`output_lock`). On any exception the temporary folder is removed and `out` (old
    contents included) is left exactly as it was; an `OSError` while writing becomes one error
    naming the file and the cause.
    """
    out = Path(out)
    check_apart(out, inputs or {})
    with output_lock(out):
        if out.exists() and not force:
            raise CalmEdgeError(f"{out} already exists; choose another --out or pass --force to replace the {what}")
        with reporting_os_errors(out):
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
        try:
            yield tmp
        except BaseException as e:
            full = out_of_space(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise _error_inside(e, out, tmp) from None
            if full and isinstance(e, Exception) and not isinstance(e, CalmEdgeError):
                # Libraries that write for us (safetensors, torch.save, onnx) report a full disk in
                # their own exception types; the full filesystem is the cause the user can act on.
                raise os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), out) from None
            raise
        try:
            _move_into_place(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(e, out, blame_path=True) from None


# A copy (shutil.copyfile) names the source first and the destination second; these errors are
# the destination's, whichever file they name first.
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _error_inside(error, out, tmp):
    """An `OSError` raised while filling `tmp`: a write of `out` if it names a file there, else a read."""
    if not error.filename:
        return os_error(error, out)
    filename = error.filename
    if error.errno in _WRITE_ERRORS and getattr(error, "filename2", None):
        filename = error.filename2
    name, inside = Path(os.path.abspath(filename)), Path(tmp).absolute()
    if not name.is_relative_to(inside):
        return os_error(error, name, verb="read")
    shown = out / name.relative_to(inside)  # the name the file would have had, not the hidden temporary's
    return os_error(error, shown, blame_path=True)


def _move_into_place(tmp, out):
    if not out.exists():
        _replace(tmp, out)
        return
    # Move the old folder aside first so that `out` is never missing or mixed (a writer killed
    # between the two renames is undone by the next one's `_clean_leftovers`).
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        _replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _replace(source, target):
    """The one rename that publishes a finished file or folder (the tests inject faults here)."""
    os.replace(source, target)
