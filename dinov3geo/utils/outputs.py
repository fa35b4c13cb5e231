"""The output-path guard shared by every writer: never replace or delete what the toolkit did not create.

Before any work, a writer calls :func:`guard_output` with its output path and everything it reads (images,
tile stores, models, AOIs, label files). The guard refuses, naming both paths:

* an output that **is** an input (same path after resolving ``..`` and symbolic links, or a hard link to it);
* an output folder that **contains** an input (writing it would delete or shadow the input);
* an output that **lies inside** an input folder (a tile store, a band folder, a model folder);
* a folder output at an **existing folder that dinov3geo did not create** (a non-empty folder without our
  marker): a user's folder is never wiped or filled with our files;
* a file output where a folder exists, and a folder output where a file exists.

Folders the toolkit creates carry a marker file, ``.dinov3geo.json`` (``{"kind": ..., "created": ...}``);
its Zarr stores (tile stores, feature stores) are recognised by the ``format`` attribute of their root
``zarr.json`` instead (:data:`ZARR_FORMATS`). Only such folders are ever replaced or deleted
(:func:`remove_owned`); :func:`claim_output` combines the guard with the output's lock
(:func:`dinov3geo.utils.locks.output_lock`) so two processes never write one output at once.

Remote inputs (``/vsicurl/...``, ``s3://...``, ``https://...``) cannot collide with a local output and are
ignored.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dinov3geo.io.errors import OutputError

__all__ = [
    "MARKER",
    "OutputConflictError",
    "check_can_create",
    "claim_output",
    "folder_kind",
    "guard_output",
    "input_paths",
    "make_output_folder",
    "mark_folder",
    "remove_owned",
    "writes_output_folder",
]

#: the marker file of folders created by dinov3geo
MARKER = ".dinov3geo.json"
#: Zarr stores written by dinov3geo are recognised by the ``format`` attribute of their root ``zarr.json`` (a
#: marker file inside a Zarr store makes Zarr warn about an unknown object on every open)
ZARR_FORMATS = {"dinov3geo.tilestore": "tile-store", "dinov3geo.features": "features"}
#: kinds of dinov3geo folders that are written and replaced as a whole (nothing else may be written inside)
WHOLE_KINDS = frozenset({"tile-store", "features", "inference-parts"})


class OutputConflictError(OutputError):
    """An output path would replace, delete or write into something dinov3geo must not touch."""

    def __init__(self, path: Any, reason: str, hint: str = "") -> None:
        super().__init__(path, reason, hint or "Choose another output path; nothing was written.")


def _is_remote(p: str) -> bool:
    return p.startswith("/vsi") or "://" in p


def input_paths(obj: Any) -> list[Path]:
    """The local file/folder paths behind ``obj``: a path, a list of them, a scene (its band files), an
    inference source (its ``describe()["paths"]``), or anything else (none)."""
    out: list[Path] = []

    def add(x: Any) -> None:
        if x is None:
            return
        if isinstance(x, str | os.PathLike):
            s = os.fspath(x)
            if s and not _is_remote(s):
                out.append(Path(s).expanduser())
            return
        if isinstance(x, dict):
            for k in ("paths", "path", "store", "before", "after"):
                if k in x:
                    add(x[k])
            for k in ("inputs", "scenes", "sources"):
                if k in x:
                    add(x[k])
            return
        if isinstance(x, list | tuple | set | frozenset):
            for y in x:
                add(y)
            return
        paths = getattr(x, "paths", None)
        if paths is not None and not callable(paths):
            add(list(paths))
            return
        describe = getattr(x, "describe", None)
        if callable(describe):
            with contextlib.suppress(Exception):
                add(describe())
            return
        path = getattr(x, "path", None)
        if isinstance(path, str | os.PathLike):
            add(path)

    add(obj)
    return out


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def folder_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind of dinov3geo folder at ``path`` (``"tile-store"``, ``"features"``, ``"change"``...), None when
    it is not one of ours (or missing)."""
    p = Path(path)
    marker = p / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            return str(data.get("kind") or "dinov3geo")
        except (OSError, ValueError):
            return "dinov3geo"
    zj = p / "zarr.json"
    if zj.is_file():
        try:
            attrs = json.loads(zj.read_text()).get("attributes") or {}
        except (OSError, ValueError):
            return None
        return ZARR_FORMATS.get(str(attrs.get("format")))
    return None


def mark_folder(path: str | os.PathLike[str], kind: str, **info: Any) -> Path:
    """Write the marker that makes ``path`` (an existing folder) a dinov3geo ``kind`` folder."""
    p = Path(path)
    from dinov3geo import __version__

    data = {"kind": kind, "created": datetime.now(UTC).isoformat(timespec="seconds"), "dinov3geo": __version__,
            **info}
    (p / MARKER).write_text(json.dumps(data, indent=1, default=str) + "\n")
    return p / MARKER


def _is_empty_dir(p: Path) -> bool:
    try:
        return not any(p.iterdir())
    except OSError:
        return False


def guard_output(
    out: str | os.PathLike[str],
    inputs: Iterable[Any] | Any = (),
    *,
    folder: bool = False,
    kind: str | None = None,
    role: str = "output",
    adopt: Iterable[str] = (),
    replaces: bool = True,
) -> Path:
    """Refuse ``out`` before any work if writing it could destroy an input or a folder we did not create.

    Args:
        out: the output path (file or folder).
        inputs: what the job reads (paths, scenes, sources; see :func:`input_paths`).
        folder: ``out`` is a folder output (a Zarr store, an outputs folder). An existing folder there is
            accepted only when empty or marked as a dinov3geo folder (of ``kind``, when given).
        kind: the dinov3geo folder kind ``out`` must have if it exists (folder outputs only).
        role: the name of the output in messages (``"--out"``, ``"summary"``...).
        adopt: file names that identify an unmarked folder output as an earlier run of this kind, written
            before folders carried the marker (e.g. a training run's ``last.pt``): such a folder is accepted.
        replaces: a folder output is replaced as a whole (a Zarr store), so an input inside it is refused.
            False for folders that files are added to (a training run, an evaluation): inputs inside them
            are fine (check the files written with ``files`` of :func:`make_output_folder`).

    Returns:
        ``out`` as an absolute path (not resolved: symbolic links in it are kept).

    Raises:
        OutputConflictError: naming ``out``, the conflicting input and what to do.
    """
    o = Path(out).expanduser().absolute()
    ro = _real(o)

    def refuse(reason: str, hint: str) -> OutputConflictError:
        return OutputConflictError(o, reason if role == "output" else f"({role}) {reason}", hint)

    items = inputs if isinstance(inputs, list | tuple | set | frozenset) else [inputs]
    for p in input_paths(list(items)):
        pa = p.absolute()
        rp = _real(pa)
        same = ro == rp
        if not same and o.exists() and pa.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(o, pa)
        if same:
            raise refuse(f"it is the input {str(pa)!r}",
                                      "Write to a new path: the input would be overwritten.")
        if ro in rp.parents and (replaces or not folder):
            raise refuse(f"the folder contains the input {str(pa)!r}",
                                      "Write to a folder that holds none of the inputs.")
        if rp in ro.parents and rp.is_dir():
            raise refuse(f"it lies inside the input folder {str(pa)!r}",
                                      "Write outside the input folder.")
    for parent in ro.parents:
        pk = folder_kind(parent)
        if pk in WHOLE_KINDS:
            raise refuse(f"it lies inside the dinov3geo {pk} {str(parent)!r}",
                         "Write outside it: that folder is managed (and replaced) as a whole.")
    if o.exists() or o.is_symlink():
        if folder:
            if not o.is_dir():
                raise refuse("a file (not a folder) exists at that path",
                                          "Choose a folder path; the file was left untouched.")
            if not _is_empty_dir(o):
                have = folder_kind(o)
                if have is None and any((o / n).is_file() for n in adopt):
                    have = kind
                if have is None:
                    raise refuse(
                        "an existing folder that dinov3geo did not create is in the way",
                        "Choose a new or empty folder; its files were left untouched.")
                if kind is not None and have != kind and have != "dinov3geo":
                    raise refuse(
                        f"it is a dinov3geo {have} folder, not a {kind} folder",
                        "Choose another path; that folder was left untouched.")
        elif o.is_dir():
            raise refuse("a folder exists at that path",
                                      "Give a file name, not a folder; the folder was left untouched.")
    return o


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike[str],
    inputs: Iterable[Any] | Any = (),
    *,
    folder: bool = False,
    kind: str | None = None,
    what: str = "",
    role: str = "output",
    adopt: Iterable[str] = (),
    replaces: bool = True,
) -> Iterator[Path]:
    """:func:`guard_output`, then hold the output's lock for the body (checked again once locked)."""
    from dinov3geo.utils.locks import output_lock

    kw = {"folder": folder, "kind": kind, "role": role, "adopt": adopt, "replaces": replaces}
    o = guard_output(out, inputs, **kw)  # type: ignore[arg-type]
    with output_lock(o, what=what or kind or "write"):
        guard_output(out, inputs, **kw)  # type: ignore[arg-type]
        yield o


def make_output_folder(
    out: str | os.PathLike[str],
    inputs: Iterable[Any] | Any = (),
    *,
    kind: str,
    role: str = "output folder",
    adopt: Iterable[str] = (),
    replaces: bool = False,
    files: Iterable[str] = (),
) -> Path:
    """:func:`guard_output` for a folder output, then create it (with parents) and mark it as a dinov3geo
    ``kind`` folder (an empty existing folder is adopted). Returns the absolute path.

    ``adopt``: file names that identify an unmarked folder as an earlier run of this kind (written before
    folders carried the marker, e.g. a training run's ``last.pt``); such a folder is marked and accepted.
    ``files``: names of the files the job writes into the folder; each is checked against the inputs too.
    """
    o = guard_output(out, inputs, folder=True, kind=kind, role=role, adopt=adopt, replaces=replaces)
    for name in files:
        guard_output(o / name, inputs, role=role)
    o.mkdir(parents=True, exist_ok=True)
    if folder_kind(o) is None:
        mark_folder(o, kind, **({"adopted": True} if any((o / n).is_file() for n in adopt) else {}))
    return o


def remove_owned(path: str | os.PathLike[str], kinds: Iterable[str] | None = None) -> bool:
    """Delete the folder ``path`` only if dinov3geo created it (marker or tile store) — of one of ``kinds``
    when given; delete a file only if it is not a folder. Returns whether something was removed.

    Raises:
        OutputConflictError: ``path`` is a folder dinov3geo did not create (or of another kind).
    """
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return False
    if p.is_symlink() or not p.is_dir():
        p.unlink()
        return True
    have = folder_kind(p)
    if have is None and not _is_empty_dir(p):
        raise OutputConflictError(p, "it is a folder that dinov3geo did not create; refusing to delete it",
                                  "Move it away yourself if it should be replaced.")
    wanted = set(kinds) if kinds is not None else None
    if wanted is not None and have is not None and have not in wanted and have != "dinov3geo":
        raise OutputConflictError(p, f"it is a dinov3geo {have} folder, not one of {sorted(wanted)}; refusing to "
                                  "delete it", "Move it away yourself if it should be replaced.")
    shutil.rmtree(p)
    return True


def check_can_create(path: str | os.PathLike[str]) -> Path:
    """Fail early, creating nothing, if ``path`` could not be created: its nearest existing ancestor must be a
    writable folder. Returns ``path`` as an absolute path."""
    p = Path(path).expanduser().absolute()
    anc = p if p.exists() else p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(p, f"{str(anc)!r} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(p, f"the folder {str(anc)!r} is not writable")
    return p


def writes_output_folder(
    param: str,
    *,
    kind: str,
    inputs: Callable[[dict[str, Any]], Iterable[Any]],
    files: Iterable[str] = (),
    what: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a task writing files into the folder named by its argument ``param``.

    Before the task runs: :func:`guard_output` (``folder=True``, ``replaces=False``: files are added to the
    folder) against ``inputs(arguments)`` (the bound arguments by name -> what the task reads), each of
    ``files`` checked against them too, and :func:`check_can_create`; then the folder's lock is held for the
    whole task. Nothing is created here: the task creates the folder (:func:`make_output_folder`) once its
    inputs and models have loaded, so a task that fails early leaves no empty folder behind.
    """
    names = tuple(files)

    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from dinov3geo.utils.locks import output_lock

            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            ins = list(inputs(dict(bound.arguments)))
            out = guard_output(bound.arguments[param], ins, folder=True, kind=kind, replaces=False, role=param)
            for n in names:
                guard_output(out / n, ins, role=param)
            check_can_create(out)
            with output_lock(out, what=what or kind):
                return func(*bound.args, **bound.kwargs)

        return wrapper

    return deco
