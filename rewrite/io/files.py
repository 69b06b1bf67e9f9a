"""Files: JSON in and out, paths, and writing safely (a temporary sibling renamed into place when complete,
checked for room and permission up front, with what a killed run left cleaned up)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Iterator

import torch

from ..actions import RewriteError


def real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def same_or_inside(path: str, container: str) -> bool:
    """Whether ``path`` is ``container`` or lies inside it (after resolving links)."""
    p, c = real(path), real(container)
    return p == c or p.startswith(c.rstrip(os.sep) + os.sep)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while we load (we report problems ourselves)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is optional for non-HF sources
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise RewriteError(f"{what} {path!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
                           "Fix or re-create the file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RewriteError(f"{what} {path!r} could not be read ({first_line(err)}).") from None


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


@contextlib.contextmanager
def atomic_path(target: str, overwrite: bool = False, is_dir: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on failure it is removed.

    An interrupted or failed write leaves ``target`` as it was (absent, or the old version).
    """
    target = os.path.abspath(target)
    if os.path.lexists(target) and not overwrite:
        raise RewriteError(f"Output {target!r} already exists. Pass --overwrite (overwrite=True) to replace it, "
                           "or choose another path.")
    parent = os.path.dirname(target) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise RewriteError(f"Cannot create the folder {parent!r} for output {target!r} ({first_line(err)}).") from None
    base = os.path.basename(target.rstrip(os.sep))
    _remove_stale(parent, base)
    prefix = f".{base}.tmp-{os.getpid()}-"
    try:
        if is_dir:
            tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(base)[1], dir=parent)
            os.close(fd)
    except OSError as err:
        raise RewriteError(f"Cannot write into {parent!r} ({first_line(err)}); choose a writable output path.") from None
    old = None
    try:
        try:
            yield tmp
        except OSError as err:  # a full disk, a quota, a folder made read-only meanwhile: the user's to fix
            raise RewriteError(f"Writing {target!r} failed ({first_line(err)}); nothing was written. Free some "
                               "space or choose another output path.") from None
        _default_permissions(tmp)
        if os.path.lexists(target):
            old = tempfile.mkdtemp(prefix=f".{base}.old-{os.getpid()}-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        tmp = None
    except BaseException:
        if old is not None and not os.path.lexists(target):
            os.rename(old, target)
            old = None
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.lexists(leftover):
                if os.path.isdir(leftover) and not os.path.islink(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    os.remove(leftover)


def _remove_stale(parent: str, base: str) -> None:
    """Remove what a killed run left beside ``base``: temporary siblings whose writing process is gone."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(re.escape(f".{base}.") + r"(?:tmp|old)-(\d+)-.*", name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, owned by someone else
    return True


def check_space(path: str, need_bytes: int) -> None:
    """Refuse up front an output whose folder is not writable or lacks room for about ``need_bytes``."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.isdir(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RewriteError(f"Cannot write {path!r}: {parent!r} is not writable. Choose another output path.")
    free = shutil.disk_usage(parent).free
    if free < need_bytes * 1.05 + (1 << 20):
        raise RewriteError(f"Not enough free space for {path!r}: about {need_bytes / 2**20:.0f} MiB needed, "
                           f"{free / 2**20:.0f} MiB free in {parent!r}. Free some space or choose another path.")


def model_bytes(model: Any) -> int:
    """The bytes of a model's parameters and buffers (what a saved copy needs, roughly)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _default_permissions(path: str) -> None:
    """Temporary files are private (0600/0700); give the finished output the usual permissions (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~umask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def check_output(out: str, inputs: list[str], overwrite: bool, what: str = "Output") -> str:
    """Refuse an output that is an input, lies inside one, or contains one; or exists without ``overwrite``."""
    for src in inputs:
        if not src or not os.path.lexists(src):
            continue
        if same_or_inside(out, src):
            raise RewriteError(f"{what} {out!r} is the input {src!r} or lies inside it; rewrite never writes into its "
                               "input. Choose an output path outside the input (e.g. a sibling folder).")
        if os.path.lexists(out) and same_or_inside(src, out):
            raise RewriteError(f"{what} {out!r} contains the input {src!r}; replacing it would delete the input. "
                               "Choose another output path.")
    if os.path.lexists(out) and not overwrite:
        raise RewriteError(f"{what} {out!r} already exists. Pass --overwrite to replace it, or choose another path.")
    return out
