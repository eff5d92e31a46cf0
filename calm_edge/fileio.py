"""Writing files and folders so that a reader never sees them half-written.

Everything calm-edge produces (tokenizers, token shards, checkpoints, packages) is written
under a temporary name beside its destination and renamed into place once complete. A crash
or an error half-way leaves the previous version, if any, untouched.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from calm_edge.errors import CalmEdgeError


def sha256_of(path, block_size=1 << 20):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path, data: bytes):
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path, obj):
    """Write `obj` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_output_dir(out, force=False, what="output"):
    """Yield a temporary folder to fill; on success it replaces `out` in one rename.

    If `out` already exists, refuse unless `force`. On any exception the temporary folder is
    removed and `out` (old contents included) is left exactly as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise CalmEdgeError(f"{out} already exists; choose another --out or pass --force to replace the {what}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Move the old folder aside first so that `out` is never missing or mixed.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
