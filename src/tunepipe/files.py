"""Atomic writes: outputs appear whole or not at all (write to a temp path, then rename).

Temp and backup paths are hidden siblings that carry the writer's pid (`.NAME.PID.tmp`, `.NAME.PID.old`), so a
later writer of the same path can tell leftovers of a dead process (kill -9, power loss) from a live writer's
work, and clean them up (or put a moved-aside output back) before it starts.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Replace the file's content atomically. A symlink is written through (its target is replaced, the link stays);
    the file keeps its mode, and a new file gets the mode a plain open() would give it (0666 less the umask)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _sibling(path, os.getpid(), "tmp")
    # os.open applies the umask to 0o666, as open() does (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            with contextlib.suppress(FileNotFoundError):
                os.chmod(fh.fileno(), path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path`, on failure it is removed.

    The old output is moved aside, the new one renamed in, then the old one deleted: at every instant one of
    them is complete, and `recover` (run first) puts a moved-aside output back if its writer died midway."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    pid = os.getpid()
    tmp, old = _sibling(path, pid, "tmp"), _sibling(path, pid, "old")
    os.mkdir(tmp, 0o777)  # the umask applies, as for any new folder (mkdtemp would make it 0700)
    try:
        yield tmp
        if os.path.lexists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(path):
            os.replace(old, path)
        raise
    _remove(old)


def recover(path: str | Path) -> None:
    """Clean up after writers of `path` that died: remove their temp copies, and put back an old output that was
    moved aside when the new one never came in (else delete it). Live writers' siblings are left alone."""
    path = Path(path)
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.(tmp|old)")
    # Temp copies first, so a restored output never sits beside a half-written one.
    for name in sorted(names, key=lambda n: n.endswith(".old")):
        m = pattern.fullmatch(name)
        if not m or _alive(int(m[1])):
            continue
        sibling = path.parent / name
        if m[2] == "old" and not os.path.lexists(path):
            os.replace(sibling, path)
        else:
            _remove(sibling)


def write_csv(path: str | Path, rows: list[dict], cols: list[str]) -> None:
    """Rows as CSV, columns in the given order, quoted where needed (a label may hold a comma or a quote)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _sibling(path: Path, pid: int, kind: str) -> Path:
    return path.parent / f".{path.name}.{pid}.{kind}"


def _alive(pid: int) -> bool:
    """Whether another process with this pid is running (a zombie is dead: it only waits to be reaped)."""
    if pid == os.getpid():
        return False  # a previous process that had our pid: we are not writing yet
    if os.path.isdir("/proc/self"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    try:  # no /proc (macOS): signal 0 only checks that the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _jsonable(obj: object) -> object:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
