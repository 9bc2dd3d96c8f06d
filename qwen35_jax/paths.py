"""The one path layer: every file the system reads or writes goes through here, local or `gs://`.

Paths are `etils.epath.Path` (what orbax uses): local paths through `os`, `gs://bucket/...` through fsspec/gcsfs.
What object stores cannot do is handled here, once:

- `glob`: patterns anywhere in the path (`gs://b/train/*.array_record`, `data/**/*.txt`), sorted.
- `write_text`: atomic on local disks (temporary file + rename); an object upload is atomic already.
- `AppendLog`: an append-only text file (metrics.jsonl); objects cannot be appended to, so a remote one is kept in
  memory and rewritten whole at most every `sync_s` seconds and on close.
- `MirroredDir`: a directory that a library writes with plain local I/O (TensorBoard event files); remote ones are
  written to a local staging folder and uploaded on `sync()`.
- `local_file`: a local filename for libraries that only open local files (ArrayRecord): remote files are staged
  into a local cache, checked by size, downloaded once per host.
- `local_dir` / `upload_dir`: the same for whole folders (Hugging Face checkpoints read and written locally).
- `move`: renames a file or folder (a recursive copy and delete on object stores).

Set `STORAGE_EMULATOR_HOST` (gcsfs) and `TENSORSTORE_GCS_HTTP_URL` (orbax's tensorstore) to use a GCS emulator.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import logging
import os
import shutil
import tempfile
import time

from etils import epath

from qwen35_jax.errors import UserError

log = logging.getLogger(__name__)

Path = epath.Path
REMOTE_SCHEMES = ("gs://",)
_MAGIC = set("*?[")


def is_remote(p) -> bool:
    return str(p).startswith(REMOTE_SCHEMES)


def path(p) -> epath.Path:
    """A path from a user string (or a path): `~` expanded for local paths, `gs://` kept as a URI."""
    if isinstance(p, epath.Path):
        return p
    text = os.fspath(p)
    if "://" in text and not is_remote(text):
        raise UserError(f"{text}: unsupported URI scheme (local paths and gs:// are supported)")
    return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def has_glob(p) -> bool:
    return bool(_MAGIC & set(str(p)))


def _fs(url: str):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(url)
    return fs


def glob(pattern, files_only: bool = False) -> list[epath.Path]:
    """Paths matching `pattern` (`*`, `?`, `[..]`, `**` for any depth), sorted; only files with `files_only`."""
    text = str(pattern)
    if is_remote(text):
        found = _fs(text).glob(text, detail=True)
        return sorted(path("gs://" + m.removeprefix("gs://")) for m, info in found.items()
                      if not files_only or info.get("type") == "file")
    return sorted(path(m) for m in _glob.glob(os.path.expanduser(text), recursive=True)
                  if not files_only or os.path.isfile(m))


def split_glob(text: str) -> tuple[str, str]:
    """'gs://b/train/*.x' -> ('gs://b/train', '*.x'): the folder before the first component with a wildcard."""
    parts = str(text).split("/")
    i = next(i for i, part in enumerate(parts) if has_glob(part))
    return "/".join(parts[:i]) or ".", "/".join(parts[i:])


def write_text(p, text: str) -> None:
    """Writes a whole file so that readers see the old or the new content, never a part."""
    p = path(p)
    if is_remote(p):
        p.write_text(text)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(p.parent), prefix=f".{p.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, str(p))


def move(src, dst) -> None:
    """Renames a file or folder; `dst`'s parent is created. On object stores: copy everything, then delete."""
    src, dst = path(src), path(dst)
    if is_remote(src) != is_remote(dst):
        raise ValueError(f"cannot move {src} to {dst}: one is local, the other remote")
    if is_remote(src):
        fs = _fs(str(src))
        fs.mv(str(src), str(dst), recursive=True)
        fs.invalidate_cache()
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


def cache_dir() -> str:
    root = os.environ.get("QWEN35_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen35_jax")
    return os.path.join(root, "staged")


def local_file(p) -> str:
    """A local filename holding `p`'s bytes: `p` itself when local, else a copy staged in `cache_dir()` (reused
    while the remote size is unchanged; downloaded to a temporary name first, so a killed download is never used)."""
    p = path(p)
    if not is_remote(p):
        return str(p)
    fs = _fs(str(p))
    size = int(fs.info(str(p))["size"])
    key = hashlib.sha256(str(p).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), key, p.name)
    if os.path.exists(target) and os.path.getsize(target) == size:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".download.")
    os.close(fd)
    try:
        fs.get_file(str(p), tmp)
        if os.path.getsize(tmp) != size:
            raise OSError(f"{p}: downloaded {os.path.getsize(tmp)} of {size} bytes")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("staged %s (%d bytes) at %s", p, size, target)
    return target


def local_dir(p) -> str:
    """A local folder holding the files of folder `p` (not its subfolders): `p` itself when local, else each file
    staged as by `local_file`, into one folder (for readers of Hugging Face checkpoint folders)."""
    p = path(p)
    if not is_remote(p):
        return str(p)
    key = hashlib.sha256(str(p).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir(), key + ".dir")
    os.makedirs(folder, exist_ok=True)
    for child in p.iterdir():
        if child.is_file():
            staged = local_file(child)
            link = os.path.join(folder, child.name)
            if not os.path.exists(link):
                os.symlink(staged, link)
    return folder


def upload_dir(local: str, dst) -> None:
    """Copies the files of a local folder tree to `dst` (local or remote)."""
    dst = path(dst)
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            target = dst / os.path.relpath(src, local)
            if not is_remote(target):
                target.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as f:
                target.write_bytes(f.read())


class AppendLog:
    """An append-only text file. Local: appended and flushed line by line. Remote: the whole object is rewritten
    at most every `sync_s` seconds and on `close()` (an existing object's lines are kept, as on resume)."""

    def __init__(self, p, sync_s: float = 30.0):
        self.path, self.sync_s = path(p), sync_s
        self.remote = is_remote(self.path)
        if self.remote:
            self._text = self.path.read_text() if self.path.exists() else ""
            self._dirty, self._last = False, 0.0
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(str(self.path), "a")

    def write(self, line: str) -> None:
        if not self.remote:
            self._f.write(line)
            self._f.flush()
            return
        self._text += line
        self._dirty = True
        if time.monotonic() - self._last >= self.sync_s:
            self.sync()

    def sync(self) -> None:
        if self.remote and self._dirty:
            self.path.write_text(self._text)
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.sync()
        else:
            self._f.close()


class MirroredDir:
    """A folder for libraries that write local files: `local` is the folder itself when `p` is local, else a
    staging folder whose files `sync()` uploads to `p` (changed files only, compared by size)."""

    def __init__(self, p):
        self.path = path(p)
        self.remote = is_remote(self.path)
        self._uploaded: dict[str, int] = {}
        if self.remote:
            self.local = tempfile.mkdtemp(prefix="qwen35-mirror-")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.local = str(self.path)

    def sync(self) -> None:
        if not self.remote:
            return
        for root, _, files in os.walk(self.local):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, self.local)
                size = os.path.getsize(src)
                if self._uploaded.get(rel) != size:
                    (self.path / rel).write_bytes(open(src, "rb").read())
                    self._uploaded[rel] = size

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
