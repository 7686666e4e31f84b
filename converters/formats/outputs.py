"""How every nemotune verb writes its output (prep, convert, export, eval, launch scripts, training adapters).

One rule, one mechanism (:func:`output_target`):
  - the output is written into a temporary sibling ``.<name>.partial-<host>-<pid>-<random>`` and renamed onto
    the target only when complete; an error, a full disk or Ctrl-C removes the temporary, and an earlier
    output stays intact until the rename;
  - an existing target is replaced only when it is a previous output of the same verb -- recognised by its
    marker (``nemotune_output.json`` in a directory; the ``nemotune.output`` PAX header of a tar such as
    ``.nemo``) -- AND the user asked (``--overwrite`` or the verb's documented config key); anything else
    already there is never touched;
  - an input is never an output: the target may not be, contain or lie inside any input path;
  - temporaries of a killed run (same verb, same target, this host, dead pid) are removed by the next run,
    which says so in one line; a previous output set aside mid-replace (``.<name>.old-...``) is put back;
  - outputs follow the user's umask (files ``0o666 & ~umask``, directories ``0o777 & ~umask``).
Failures are :class:`OutputError` (a ``ValueError``): one line naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

MARKER = "nemotune_output.json"
PAX_KEY = "nemotune.output"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")
_LOW_SPACE = 1 << 20  # a write that failed with less than this free is reported as a full disk


class OutputError(ValueError):
    """An output cannot be written where asked; the message names the path and the fix."""


def umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes a plain ``open`` / ``mkdir`` would have given."""
    mask = umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        os.chmod(item, dir_mode if item.is_dir() else file_mode)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname().split(".")[0]) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (another user's live process counts)."""
    try:
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


def marker_of(path: Path) -> Optional[str]:
    """The verb that wrote ``path`` (from its marker), or None when nemotune did not write it."""
    try:
        if path.is_dir() and not path.is_symlink():
            data = json.loads((path / MARKER).read_text())
            return data.get("verb") if isinstance(data, dict) else None
        if path.is_file() and not path.is_symlink() and tarfile.is_tarfile(path):
            with tarfile.open(path, "r:") as archive:
                return archive.pax_headers.get(PAX_KEY)
    except (OSError, ValueError, tarfile.TarError):
        return None
    return None


def tar_marker(verb: str) -> dict:
    """PAX global headers marking a tar (``.nemo``) as an output of ``verb``; pass to ``tarfile.open``."""
    return {PAX_KEY: verb}


def _relation(out: Path, source: Path) -> Optional[str]:
    if out == source:
        return "is"
    if source in out.parents:
        return "lies inside"
    if out in source.parents:
        return "contains"
    return None


def check_not_input(out: Path, inputs: Iterable, *, verb: str) -> None:
    resolved = out.resolve()
    for source in inputs:
        if source is None or str(source) == "":
            continue
        source_path = Path(str(source)).expanduser()
        if not source_path.exists():
            continue
        relation = _relation(resolved, source_path.resolve())
        if relation:
            raise OutputError(f"{out}: the output {relation} the input {source}; nemotune {verb} never writes "
                              "over or around its inputs -- choose an output path outside it")


def clean_stale(out: Path, *, verb: str, quiet: bool = False) -> list[Path]:
    """Remove temporaries a killed run of this verb left for ``out`` (this host, dead pid); put back a
    previous output set aside mid-replace. Returns what was removed."""
    parent = out.parent
    if not parent.is_dir():
        return []
    removed, host = [], _host()
    for entry in sorted(parent.iterdir()):
        match = _TEMP.match(entry.name)
        if not match or match["name"] != out.name or match["host"] != host or pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old":
            if not out.exists() and not out.is_symlink():
                os.replace(entry, out)
                _say(f"nemotune {verb}: restored {out} (a previous output set aside by an interrupted run, "
                     f"pid {match['pid']})", quiet)
                continue
        size = _size(entry)
        _remove(entry)
        removed.append(entry)
        _say(f"nemotune {verb}: removed {entry} ({size / 2**20:.1f} MiB left by an interrupted run, "
             f"pid {match['pid']})", quiet)
    return removed


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _say(line: str, quiet: bool) -> None:
    if not quiet:
        print(line, file=sys.stderr)


def disk_full(err: BaseException) -> bool:
    """Whether an exception, or any it wraps (torch DCP's per-rank failures included), is a full disk."""
    seen, stack = set(), [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if "No space left" in text or "StorageFull" in text or "os error 28" in text:
            return True
        stack += [current.__cause__, current.__context__]
        # torch DCP's CheckpointException (a BaseException): rank -> (exception, traceback)
        failures = getattr(current, "_failures", None) or getattr(current, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                stack += [f for f in (failure if isinstance(failure, tuple) else (failure,))
                          if isinstance(f, BaseException)]
    return False


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def refuse_existing(out: Path, verb: str, overwrite: bool, hint: str) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    owner = marker_of(out)
    if owner != verb:
        what = f"an output of nemotune {owner}" if owner else "not an output of nemotune " + verb
        raise OutputError(f"{out} already exists and is {what}; nothing was changed -- choose another output "
                          "path (nemotune never replaces what it did not write)")
    if not overwrite:
        raise OutputError(f"{out} already exists (a previous nemotune {verb} output); pass {hint} to replace it, "
                          "or choose another output path")


def _writable_parent(out: Path, verb: str) -> None:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create its folder {parent} ({err.strerror or err}); choose a writable "
                          "output path") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(parent) else "permission denied"
        raise OutputError(f"{out}: cannot write in {parent} ({reason}); choose a writable output path")


def _check_writable(out: Path) -> None:
    """The nearest existing folder above ``out`` must be writable (nothing is created here)."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{out}: {ancestor} is not a folder; choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(ancestor) else "permission denied"
        raise OutputError(f"{out}: cannot write in {ancestor} ({reason}); choose a writable output path")


def preflight(out: str | Path, *, verb: str, inputs: Iterable = (), overwrite: bool = False,
              overwrite_hint: str = "--overwrite") -> None:
    """Every refusal :func:`output_target` would make, checked before a verb reads or computes anything:
    the target is no input, lies on a writable file system, and is new or a replaceable previous output."""
    out = Path(out)
    check_not_input(out, inputs, verb=verb)
    _check_writable(out)
    refuse_existing(out, verb, overwrite, overwrite_hint)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def output_target(out: str | Path, *, verb: str, overwrite: bool = False, is_dir: bool = True,
                  inputs: Iterable = (), overwrite_hint: str = "--overwrite", quiet: bool = False,
                  error: type[Exception] = OutputError) -> Iterator[Path]:
    """Yield a temporary path to write the output of ``verb`` into; it becomes ``out`` when the block succeeds.

    ``is_dir``: the output is a directory (the yielded path, marked with :data:`MARKER` on success); else a
    file (the yielded path is a file name inside a temporary directory; a tar written there should carry
    :func:`tar_marker`). Every refusal is raised as ``error`` (default :class:`OutputError`) before anything
    is written.
    """
    out = Path(out)
    try:
        check_not_input(out, inputs, verb=verb)
        _writable_parent(out, verb)
        clean_stale(out, verb=verb, quiet=quiet)
        refuse_existing(out, verb, overwrite, overwrite_hint)
    except OutputError as err:
        raise (err if error is OutputError else error(str(err))) from None
    token = f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp_root = out.parent / f".{out.name}.partial-{token}"
    try:
        os.mkdir(tmp_root)
    except OSError as err:
        raise error(f"{out}: cannot write in {out.parent} ({err.strerror or err}); choose a writable output "
                    "path") from err
    tmp = tmp_root if is_dir else tmp_root / out.name
    try:
        yield tmp
        if is_dir:
            (tmp / MARKER).write_text(json.dumps({"written_by": "nemotune", "verb": verb}) + "\n")
        apply_umask(tmp)
        if out.exists() or out.is_symlink():
            refuse_existing(out, verb, overwrite, overwrite_hint)  # nothing else appeared meanwhile
            if is_dir:
                old = out.parent / f".{out.name}.old-{token}"
                os.replace(out, old)
                os.replace(tmp, out)
                _remove(old)
            else:
                os.replace(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException as err:
        free = _free_bytes(out.parent)
        _remove(tmp_root)
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit))
        if not interrupted and (disk_full(err) or (
                not isinstance(err, ValueError) and free is not None and free < _LOW_SPACE)):
            raise error(f"{out}: no space left on device in {out.parent} while writing; the partial output was "
                        "removed -- free space or choose another output path") from err
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise error(f"{out}: cannot write {err.filename or out.parent} ({err.strerror}); the partial output "
                        "was removed -- choose a writable output path") from err
        raise
    finally:
        _remove(tmp_root)


def write_new_file(path: str | Path, text: str) -> Path:
    """Write ``text`` to a new file at ``path`` atomically, never replacing an existing file: when ``path``
    is taken, ``<stem>-1<suffix>``, ``-2``... is used. Returns the path written."""
    path = Path(path)
    _writable_parent(path, "launch")
    tmp = path.parent / f".{path.name}.partial-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.write_text(text)
    try:
        apply_umask(tmp)
        candidate, n = path, 0
        while True:
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                n += 1
                candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    finally:
        _remove(tmp)
