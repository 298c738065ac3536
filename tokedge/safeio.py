"""Reading files of an artifact the way a hostile artifact cannot exploit: every path component
opened without following symbolic links, only regular files (a FIFO or device is refused before
it is read, so it cannot block), no hard links, and a size bound checked on the open descriptor
before a byte is read. The bytes returned are the bytes that are then hashed and used, so a
file swapped on disk after the check changes nothing (see docs/safety.md).

Torch-free and onnx-free: the device runtime uses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tokedge.errors import ArtifactError, ArtifactPathError, IntegrityError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Bounds against a hostile artifact or input. Defaults fit any model tokedge exports."""

    manifest_bytes: int = 16 * MiB  # tokedge.json (chat templates are a few KiB)
    engines_index_bytes: int = 16 * MiB  # engines.json of a `tokedge build` directory (a few KiB)
    tokenizer_bytes: int = 64 * MiB  # tokenizer.json (large vocabularies are ~10-30 MiB)
    reference_bytes: int = 256 * MiB  # reference.npz on disk
    reference_unpacked_bytes: int = 1 * GiB  # its arrays once decompressed
    graph_bytes: int = 64 * GiB  # one .onnx file or its external data
    template_chars: int = 1 * MiB  # rendered chat template (before placeholder expansion)
    template_seconds: float = 2.0  # wall time to render the chat template
    prompt_chars: int = 256 * 1024  # one --prompt text


DEFAULT_LIMITS = Limits()


def _split(rel: str) -> list[str]:
    if not rel or os.path.isabs(rel) or rel.startswith("/"):
        raise IntegrityError(f"artifact path '{rel}' is absolute; artifact files must be relative to it")
    parts = [p for p in PurePosixPath(rel).parts if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise IntegrityError(f"artifact path '{rel}' leaves the artifact directory ('..')")
    return parts


def open_dir(root: Path) -> int:
    """An O_DIRECTORY descriptor of the artifact root (the root itself may be reached through links)."""
    try:
        return os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except FileNotFoundError:
        raise ArtifactPathError(f"artifact directory '{root}' does not exist") from None
    except NotADirectoryError:
        raise ArtifactPathError(f"'{root}' is a file, not an artifact directory; pass the directory `tokedge export` wrote") from None
    except OSError as exc:
        raise ArtifactPathError(f"cannot open artifact directory '{root}': {exc.strerror}") from None


def open_regular(root_fd: int, rel: str, what: str | None = None) -> int:
    """Open `rel` below the directory `root_fd` read-only, refusing symlinks in any component,
    anything but a regular file, and hard links. Returns a blocking descriptor."""
    what = what or f"artifact file '{rel}'"
    parts = _split(rel)
    fd = root_fd
    opened: list[int] = []
    try:
        for part in parts[:-1]:
            try:
                fd = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                raise IntegrityError(f"{what} is missing; re-export the artifact") from None
            except (NotADirectoryError, OSError) as exc:
                raise IntegrityError(f"{what}: '{part}' is a symbolic link or not a directory ({exc.strerror}); "
                                     "copy the artifact instead of linking it") from None
            opened.append(fd)
        try:
            # O_NONBLOCK so that opening a FIFO returns at once instead of waiting for a writer
            leaf = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            raise IntegrityError(f"{what} is missing; re-export the artifact") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError(f"{what} is a symbolic link; artifact files must be regular files inside it "
                                     "(copy the artifact instead of linking it)") from None
            raise IntegrityError(f"{what} cannot be opened ({exc.strerror})") from None
    finally:
        for d in opened:
            os.close(d)
    st = os.fstat(leaf)
    if not stat.S_ISREG(st.st_mode):
        os.close(leaf)
        raise IntegrityError(f"{what} is not a regular file (a FIFO, device or directory); re-export the artifact")
    if st.st_nlink > 1:
        os.close(leaf)
        raise IntegrityError(f"{what} is a hard link; copy the artifact instead of linking it")
    os.set_blocking(leaf, True)
    return leaf


READ_ONCE = 1 << 30  # files up to this size are read with one read() into their own bytes object


def read_fd(fd: int, limit: int, what: str) -> bytes:
    """All bytes of an open regular file, refusing files over `limit` before reading them.

    A file up to READ_ONCE is read by one read() of its size + 1 straight into the bytes object
    returned (no chunks joined: half the time on a 500 MB graph), the extra byte catching a file
    that grew since its size was taken; larger files, and reads the kernel cuts short, go on in
    chunks. Every path checks the limit on what was actually read."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise ArtifactError(f"{what} is {size} bytes, over the limit of {limit}; it is not a file tokedge writes")
    remaining = limit + 1  # a file that grows while we read is caught too
    first = os.read(fd, min(remaining, size + 1, READ_ONCE))
    chunks = [first]
    remaining -= len(first)
    while remaining > 0 and first:
        block = os.read(fd, min(remaining, 16 * MiB))
        if not block:
            break
        chunks.append(block)
        remaining -= len(block)
    data = first if len(chunks) == 1 else b"".join(chunks)
    if len(data) > limit:
        raise ArtifactError(f"{what} grew past the limit of {limit} bytes while being read")
    return data


def read_regular(root_fd: int, rel: str, limit: int, what: str | None = None) -> bytes:
    fd = open_regular(root_fd, rel, what)
    try:
        return read_fd(fd, limit, what or f"artifact file '{rel}'")
    finally:
        os.close(fd)


def read_regular_path(root: Path, rel: str, limit: int, what: str | None = None) -> bytes:
    """`read_regular` below the directory `root`."""
    fd = open_dir(Path(root))
    try:
        return read_regular(fd, rel, limit, what)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes | str, mode: int = 0o666) -> None:
    """Create `path` and write `data`: the file must not exist yet (O_EXCL) and a symbolic link
    planted at its name is never followed (O_NOFOLLOW), so a write cannot land elsewhere."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` whole: written to a temporary file of an unpredictable name,
    created exclusively beside it (a name planted in advance, a symlink included, is never
    opened), then renamed over `path` (a rename replaces a symlink at `path`, it never writes
    through it). Readable as the umask allows, like any file the user writes."""
    import tempfile

    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def printable(text: object, limit: int = 400, keep: str = "") -> str:
    """`text` safe to print on one terminal line: control characters (newlines, ANSI escapes,
    carriage returns) shown as escapes, and long strings cut."""
    s = str(text)
    out = []
    for ch in s:
        code = ord(ch)
        if ch == "\\" or ch in keep or (code >= 32 and code != 127 and not 0x80 <= code < 0xA0 and ch not in "\u2028\u2029"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def printable_text(text: str) -> str:
    """Generated text for a terminal: newlines and tabs kept, other control characters (ANSI
    escapes from a hostile vocabulary, carriage returns) shown as escapes."""
    return printable(text, limit=1 << 62, keep="\n\t")
