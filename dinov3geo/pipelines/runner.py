"""Load, validate and run a multi-stage pipeline YAML; stages that are up to date are skipped.

A pipeline file (``yaml.safe_load``; every key documented in ``pipelines/demo.yaml``)::

    name: demo                    # pipeline name (manifest file name, report metadata)
    description: ...              # free text (optional)
    outputs: outputs/demo         # outputs folder; holds the manifest pipeline-<name>.json
    vars: {data: data}            # variables for ${...} interpolation (may use ${outputs} and each other)
    stages:                       # run in order
      - name: tiles               # unique stage name
        type: ingest              # a registered stage kind (dinov3geo run --list-stages)
        after: [other]            # optional: extra dependencies besides shared files
        sources: [${data}/a.tif]  # the kind's parameters (validated against its signature)
        out: ${outputs}/tiles.zarr

``${name}`` in any string is replaced by ``vars.name`` (or ``outputs`` / ``name``); a string that is only
``${name}`` takes the variable's value with its type. Relative paths are relative to the current folder.
Unknown keys anywhere (top level, stage, stage parameter) are errors naming the key, the stage and the file.

Up-to-date check: the manifest (``<outputs>/pipeline-<name>.json``, written atomically after each stage)
stores per stage a hash of its type, resolved parameters and its input files' fingerprints (content hash for
files up to 1 MiB, size + mtime_ns above, a (relative path, size, mtime_ns) digest for folders such as Zarr
stores), and its outputs' fingerprints. A stage is skipped when the hash matches and its outputs exist
unchanged; otherwise it runs, and so does every later stage that reads one of its outputs (or names it in
``after``). A stage that fails is reported as ``stage 'X' (type Y) failed: <reason>``; it is not marked done,
and the outputs of the stages before it are kept. A stage that was interrupted (Ctrl-C, ``kill -9``) or failed
is recorded as ``pending`` in the manifest: the next run re-runs it, afresh (``ctx.rebuild``) when the
interrupted run was itself a rebuild or its parameters/inputs changed since, else resuming what it left.

Safety (checked by :func:`check_pipeline` when the pipeline is loaded, before anything runs): no stage output
may be, contain or lie inside one of its inputs, an input of an earlier stage, another stage's output, the
outputs folder (which holds the manifest) or the pipeline file. The outputs folder itself is refused when it
is an existing folder that dinov3geo did not create (unless it holds this pipeline's manifest, from a run
before folders were marked); the runner marks it as ours (``.dinov3geo.json``, kind ``pipeline-outputs``) and
holds its output lock (:func:`dinov3geo.utils.locks.output_lock`) for the whole run, so a second
``dinov3geo run`` writing the same outputs folder is refused with the first one's pid, host and command.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from dinov3geo.pipelines.stages import PipelineError, StageContext, StageKind, get_stage
from dinov3geo.utils.outputs import folder_kind, guard_output, input_paths, mark_folder

#: top-level keys of a pipeline file
TOP_KEYS = ("name", "description", "outputs", "vars", "stages")
#: keys every stage may have besides its kind's parameters
STAGE_KEYS = ("name", "type", "after", "description")
#: files up to this size are fingerprinted by content, larger ones by (size, mtime_ns)
SMALL_FILE = 1 << 20
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)\}")
#: the dinov3geo folder kind of a pipeline's outputs folder
OUTPUTS_KIND = "pipeline-outputs"


class StageFailed(RuntimeError):
    """A stage raised; the message is ``stage 'X' (type Y) failed: <reason>``."""

    def __init__(self, stage: str, type_name: str, reason: str) -> None:
        super().__init__(f"stage {stage!r} (type {type_name}) failed: {reason}")
        self.stage = stage
        self.type = type_name


@dataclass
class StageSpec:
    """One validated, interpolated stage of a pipeline."""

    name: str
    type: str
    params: dict[str, Any]
    after: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def kind(self) -> StageKind:
        return get_stage(self.type)

    def inputs(self) -> list[str]:
        return self.kind.input_paths(self.params)

    def outputs(self) -> list[str]:
        return self.kind.output_paths(self.params)

    def folders(self) -> list[str]:
        """The folders the stage writes files into (not replaced as a whole)."""
        return self.kind.folder_paths(self.params)


@dataclass
class Pipeline:
    """A validated pipeline (see module docstring)."""

    name: str
    path: Path | None
    outputs: Path
    stages: list[StageSpec]
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest_path(self) -> Path:
        return self.outputs / f"pipeline-{self.name}.json"

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise PipelineError(f"{self._where()}: no stage {name!r} (stages: {[s.name for s in self.stages]})")

    def _where(self) -> str:
        return str(self.path) if self.path else "<pipeline>"


# ------------------------------------------------------------------------------------------------ loading
def _set_override(raw: dict[str, Any], item: str, where: str) -> None:
    if "=" not in item:
        raise PipelineError(f"--set {item!r} must look like key=value (e.g. stages.features.window=256)")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text)
    parts = key.strip().split(".")
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    if parts[0] == "stages" or (parts[0] in names and parts[0] not in TOP_KEYS):
        if parts[0] == "stages":
            parts = parts[1:]
        if len(parts) < 2 or parts[0] not in names:
            raise PipelineError(f"--set {key}: no stage {parts[0] if parts else ''!r} in {where} (stages: {names})")
        cur: dict[str, Any] = stages[names.index(parts[0])]
        parts = parts[1:]
    elif parts[0] in TOP_KEYS:
        if parts[0] == "stages":
            raise PipelineError(f"--set {key}: give stages.<stage>.<parameter>")
        cur = raw
    else:
        raise PipelineError(f"--set {key}: unknown key {parts[0]!r}; use one of {list(TOP_KEYS)} or a stage name "
                            f"({names})")
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise PipelineError(f"--set {key}: {p!r} is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def _interp(value: Any, scope: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, str):
        m = _VAR.fullmatch(value)
        if m:
            return _lookup(m.group(1), scope, where)

        def sub(mm: re.Match[str]) -> str:
            return str(_lookup(mm.group(1), scope, where))

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_interp(v, scope, where) for v in value]
    if isinstance(value, dict):
        return {k: _interp(v, scope, where) for k, v in value.items()}
    return value


def _lookup(name: str, scope: Mapping[str, Any], where: str) -> Any:
    cur: Any = scope
    for part in name.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise PipelineError(f"{where}: unknown variable ${{{name}}}; defined: {sorted(scope)}")
        cur = cur[part]
    return cur


def _resolve_vars(raw_vars: dict[str, Any], base: dict[str, Any], where: str) -> dict[str, Any]:
    """Resolve variables that refer to each other (and to ``outputs``/``name``); cycles are errors."""
    scope = {**base, **raw_vars}
    for _ in range(len(raw_vars) + 2):
        new = {**base, **{k: _interp(v, scope, f"{where}: vars.{k}") for k, v in raw_vars.items()}}
        if new == scope:
            return {k: new[k] for k in raw_vars}
        scope = new
    raise PipelineError(f"{where}: vars refer to each other in a cycle: {sorted(raw_vars)}")


def _check_types(kind: StageKind, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Light type check of YAML values against the stage function's annotations (ints accepted as floats)."""
    from dinov3geo.utils.config import ConfigError, check_type

    try:
        hints = typing.get_type_hints(kind.func)
    except Exception:  # noqa: BLE001 - a third-party kind with unresolvable hints: no type check
        return params
    out = {}
    for k, v in params.items():
        try:
            out[k] = check_type(v, hints[k], k) if k in hints else v
        except ConfigError as e:
            raise PipelineError(f"{where}: parameter {k!r}: {str(e).split(': ', 1)[-1]}") from e
    return out


def load_pipeline(source: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] | None = None) -> Pipeline:
    """Read (``yaml.safe_load``), override (``["stages.features.window=256", "vars.x=1"]``), interpolate and
    validate a pipeline.

    Raises:
        PipelineError: naming the file, the stage and the key for unknown keys, unknown stage types,
            missing required parameters, badly typed values or unknown ``${variables}``.
    """
    path: Path | None = None
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if path.is_dir():
            raise PipelineError(f"pipeline file {str(path)!r} is a folder; give a pipeline YAML file "
                                "(e.g. pipelines/demo.yaml)")
        if not path.is_file():
            raise PipelineError(f"pipeline file {str(path)!r} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise PipelineError(_yaml_error(path, e)) from None
        except UnicodeDecodeError as e:
            raise PipelineError(f"{path}: not a text (UTF-8) file: byte {e.start} cannot be decoded; give a "
                                "pipeline YAML file") from None
        except OSError as e:
            raise PipelineError(f"pipeline file {str(path)!r} cannot be read: {e.strerror or e}") from None
    where = str(path) if path else "<pipeline>"
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: a pipeline is a mapping with keys {list(TOP_KEYS)}")
    for ov in overrides or []:
        _set_override(raw, ov, where)
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise PipelineError(f"{where}: unknown top-level key(s) {unknown}; allowed: {list(TOP_KEYS)}")
    name = str(raw.get("name") or (path.stem if path else "pipeline"))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise PipelineError(f"{where}: key 'name': {name!r} may only hold letters, digits, '_', '.', '-'")
    raw_vars = raw.get("vars") or {}
    if not isinstance(raw_vars, dict):
        raise PipelineError(f"{where}: key 'vars' must be a mapping")
    if "outputs" not in raw:
        raise PipelineError(f"{where}: key 'outputs' (the outputs folder) is required")
    base = {"name": name}
    base["outputs"] = _interp(raw["outputs"], {**base, **raw_vars}, f"{where}: outputs")
    variables = _resolve_vars(raw_vars, base, where)
    scope = {**base, **variables}
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise PipelineError(f"{where}: key 'stages' must be a non-empty list of stages")
    stages: list[StageSpec] = []
    seen: set[str] = set()
    for i, st in enumerate(stages_raw):
        if not isinstance(st, dict):
            raise PipelineError(f"{where}: stages[{i}] must be a mapping with 'name' and 'type'")
        sname = st.get("name")
        if not sname or not isinstance(sname, str):
            raise PipelineError(f"{where}: stages[{i}] has no 'name'")
        if sname in seen:
            raise PipelineError(f"{where}: stage name {sname!r} is used twice")
        seen.add(sname)
        if "type" not in st:
            raise PipelineError(f"{where}: stage {sname!r} has no 'type'")
        try:
            kind = get_stage(str(st["type"]))
        except PipelineError as e:
            raise PipelineError(f"{where}: stage {sname!r}: {e}") from None
        swhere = f"{where}: stage {sname!r} (type {kind.type})"
        params = {k: v for k, v in st.items() if k not in STAGE_KEYS}
        valid = kind.parameters
        bad = sorted(set(params) - set(valid))
        if bad:
            raise PipelineError(f"{swhere}: unknown parameter(s) {bad}; valid: {sorted(valid)}")
        missing = [k for k in kind.required if k not in params]
        if missing:
            raise PipelineError(f"{swhere}: missing required parameter(s) {missing}")
        params = _check_types(kind, _interp(params, scope, swhere), swhere)
        after = st.get("after") or []
        after = [after] if isinstance(after, str) else list(after)
        for a in after:
            if a not in seen or a == sname:
                raise PipelineError(f"{swhere}: key 'after': {a!r} is not an earlier stage")
        if kind.validate is not None:
            try:
                kind.validate(params)
            except PipelineError as e:
                raise PipelineError(f"{swhere}: {e}") from e
            except (ValueError, KeyError, TypeError) as e:
                raise PipelineError(f"{swhere}: {e}") from e
        stages.append(StageSpec(sname, kind.type, params, after, str(st.get("description") or "")))
    pipe = Pipeline(name, path, Path(str(base["outputs"])), stages, str(raw.get("description") or ""), variables)
    check_pipeline(pipe)
    return pipe


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """One line naming the file, the line and column, and what the parser expected."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    parts = [str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x]
    what = "; ".join(parts) if parts else " ".join(str(e).split())
    return f"{where}: not valid YAML: {what}. Fix the file there (indentation, quotes, ':' after keys)"


# ------------------------------------------------------------------------------------------ path safety
@dataclass(frozen=True)
class _PathRef:
    """A path of a stage (or of the pipeline itself) for the conflict check."""

    real: Path  #: absolute, symbolic links resolved
    shown: str  #: as the pipeline wrote it
    stage: int  #: index of the stage; -1 for the pipeline's own paths
    label: str  #: ``parameter 'out'``, ``key 'outputs'``...


def _refs(spec: StageSpec, index: int, paths: Sequence[str], names: Any = ()) -> list[_PathRef]:
    """``paths`` of ``spec`` as :class:`_PathRef` (remote paths dropped), labelled with the parameter holding
    them (looked up in ``names`` first, the kind's parameter names for that role)."""
    order = [*(names if isinstance(names, tuple) else ()), *spec.params]

    def param_of(p: str) -> str:
        for k in order:
            v = spec.params.get(k)
            vals = v if isinstance(v, list | tuple) else [v]
            if any(isinstance(x, str | os.PathLike) and str(x) == p for x in vals):
                return f"parameter {k!r}"
        return "derived from its parameters"

    out = []
    for p in paths:
        local = input_paths(p)  # drops remote paths (/vsicurl/, s3://, https://)
        if local:
            out.append(_PathRef(Path(os.path.realpath(local[0].absolute())), str(p), index, param_of(str(p))))
    return out


def _relation(a: Path, b: Path) -> str:
    """How the real path ``a`` relates to ``b``: "same" (also a hard link), "contains", "inside" or ""."""
    if a == b:
        return "same"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "inside"
    try:
        if a.is_file() and b.is_file() and os.path.samefile(a, b):
            return "same"
    except OSError:
        pass
    return ""


def check_pipeline(pipe: Pipeline) -> None:
    """Refuse, before anything runs, a pipeline whose stages would destroy what they read or each other's work.

    Each stage's outputs (replaced as a whole: files, Zarr stores) and folders (written into: training runs,
    evaluation folders) are checked against its own inputs, the inputs of the stages before it, the other
    stages' outputs and folders, the outputs folder (which holds the manifest) and the pipeline file. An
    output may not be, contain or lie inside an input (inputs inside a stage's folder are fine; so is reading
    the outputs of earlier stages), nor overlap another stage's output; a folder may not be an input, lie
    inside an input folder or be another stage's folder; neither may be or contain the outputs folder.

    Raises:
        PipelineError: one line naming the pipeline file, the stage, the parameter, both paths and what to do.
    """
    where = pipe._where()
    outputs_real = Path(os.path.realpath(pipe.outputs.expanduser().absolute()))
    manifest_real = outputs_real / pipe.manifest_path.name
    own = [_PathRef(Path(os.path.realpath(pipe.path.absolute())), str(pipe.path), -1, "the pipeline file")] \
        if pipe.path is not None else []
    outs = [_refs(s, i, s.outputs(), s.kind.outputs) for i, s in enumerate(pipe.stages)]
    dirs = [_refs(s, i, s.folders(), s.kind.folders) for i, s in enumerate(pipe.stages)]
    ins = [_refs(s, i, s.inputs(), s.kind.inputs) for i, s in enumerate(pipe.stages)]
    folder_set = {r.real for d in dirs for r in d} | {outputs_real}

    def refuse(o: _PathRef, is_out: bool, text: str, hint: str) -> PipelineError:
        s = pipe.stages[o.stage]
        what = "output" if is_out else "folder"
        return PipelineError(f"{where}: stage {s.name!r} (type {s.type}): {what} {o.shown!r} ({o.label}) {text}. "
                             f"{hint}; nothing was run")

    def mine(i: int) -> list[tuple[_PathRef, bool]]:
        return [(d, False) for d in dirs[i]] + [(o, True) for o in outs[i]]  # a folder before the files in it

    for i in range(len(pipe.stages)):
        for o, is_out in mine(i):
            # the outputs folder (it holds the manifest and every stage's outputs) and the pipeline file
            rel = _relation(o.real, outputs_real)
            if rel in ("same", "contains"):
                text = "is the pipeline's outputs folder" if rel == "same" else "contains the pipeline's outputs folder"
                raise refuse(o, is_out, f"{text} {str(pipe.outputs)!r} (key 'outputs'), which holds the manifest "
                             f"{pipe.manifest_path.name} and the other stages' outputs",
                             "Give the stage its own path inside the outputs folder (e.g. ${outputs}/<name>)")
            if o.real == manifest_real:
                raise refuse(o, is_out, "is the pipeline's manifest", "Give the stage another output path")
            for y in own:
                rel = _relation(o.real, y.real)
                if rel == "same" or (rel == "contains" and is_out):
                    raise refuse(o, is_out, f"{'is' if rel == 'same' else 'contains'} {y.label} {y.shown!r}",
                                 "Write outside the pipeline file's path")
            # its own inputs and those of the stages before it
            for j in range(i, -1, -1):
                for p in ins[j]:
                    if p.real == outputs_real:  # a stage reading the outputs folder as a whole
                        continue
                    rel = _relation(o.real, p.real)
                    if not rel or (rel == "contains" and not is_out) or (
                            rel == "inside" and not (p.real in folder_set or p.real.is_dir())):
                        continue  # inputs inside a folder that is written into are fine
                    whose = (f"its input {p.shown!r} ({p.label})" if j == i else
                             f"the input {p.shown!r} of the earlier stage {pipe.stages[j].name!r} ({p.label})")
                    text = {"same": f"is {whose}: it would be overwritten",
                            "contains": f"contains {whose}: it would be deleted",
                            "inside": f"lies inside {whose}, a folder that is read"}[rel]
                    raise refuse(o, is_out, text, "Write to a path that the pipeline does not read")
            # the outputs and folders of the stages before it
            for j in range(i):
                for o2, is_out2 in mine(j):
                    rel = _relation(o.real, o2.real)
                    if rel == "same" or (rel == "contains" and is_out) or (rel == "inside" and is_out2):
                        what2 = "output" if is_out2 else "folder"
                        text = {"same": f"is also the {what2} of", "contains": f"contains the {what2} of",
                                "inside": f"lies inside the {what2} of"}[rel]
                        raise refuse(o, is_out, f"{text} stage {pipe.stages[j].name!r} ({o2.label}: {o2.shown!r})",
                                     "Give each stage its own output path")


# ------------------------------------------------------------------------------------------- fingerprints
def fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A cheap identity of a file or folder (see module docstring); ``{"absent": True}`` when missing."""
    p = Path(path)
    if not p.exists():
        return {"absent": True}
    if p.is_file():
        st = p.stat()
        if st.st_size <= SMALL_FILE:
            return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    n = total = 0
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for f in sorted(files):
            fp = Path(root) / f
            try:
                st = fp.stat()
            except FileNotFoundError:  # removed while walking
                continue
            h.update(f"{fp.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
            total += st.st_size
    return {"files": n, "size": total, "tree": h.hexdigest()}


def _stage_key(spec: StageSpec, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"type": spec.type, "params": spec.params, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _related(a: str, b: str) -> bool:
    """Same path, or one inside the other."""
    pa, pb = Path(a).absolute(), Path(b).absolute()
    return pa == pb or pa in pb.parents or pb in pa.parents


def dependencies(pipeline: Pipeline) -> dict[str, set[str]]:
    """Per stage, the earlier stages it depends on (reads one of their outputs, or names them in ``after``)."""
    deps: dict[str, set[str]] = {}
    for i, s in enumerate(pipeline.stages):
        ins = s.inputs()
        d = set(s.after)
        for prev in pipeline.stages[:i]:
            outs = prev.outputs() + prev.folders()
            if any(_related(x, o) for x in ins for o in outs):
                d.add(prev.name)
        deps[s.name] = d
    return deps


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(pipeline: Pipeline) -> dict[str, Any]:
    """The manifest of ``pipeline`` (empty when it never ran)."""
    p = pipeline.manifest_path
    if not p.exists():
        return {"pipeline": pipeline.name, "stages": {}}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return {"pipeline": pipeline.name, "stages": {}}
    data.setdefault("stages", {})
    return data


def _write_manifest(pipeline: Pipeline, data: dict[str, Any]) -> None:
    from dinov3geo.utils.atomic import atomic_path

    with atomic_path(pipeline.manifest_path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- running
@dataclass
class StageRun:
    """What happened to one stage in a run."""

    name: str
    type: str
    status: str  #: "done", "skipped", "failed", "would run" (dry run)
    seconds: float | None = None
    result: dict[str, Any] | None = None
    reason: str = ""  #: why it ran (new, changed parameters/inputs, outputs missing, upstream, forced)


def _why_stale(spec: StageSpec, rec: dict[str, Any] | None, key: str) -> str:
    if rec is None:
        return "never ran"
    if rec.get("key") != key:
        return "parameters or inputs changed"
    for o in spec.outputs():
        if not Path(o).exists():
            return f"output {o} missing"
        if fingerprint(o) != rec.get("outputs", {}).get(o):
            return f"output {o} changed"
    return ""


def _user_inputs(pipe: Pipeline) -> list[str]:
    """The stages' inputs that no stage writes (the user's files), for the outputs-folder guard."""
    produced = [Path(os.path.realpath(Path(o).absolute())) for s in pipe.stages for o in s.outputs() + s.folders()]
    out = []
    for s in pipe.stages:
        for p in s.inputs():
            local = input_paths(p)
            if not local:
                continue
            rp = Path(os.path.realpath(local[0].absolute()))
            if not any(rp == o or o in rp.parents for o in produced):
                out.append(p)
    return out


def guard_outputs_folder(pipe: Pipeline) -> Path:
    """Refuse the outputs folder of ``pipe`` if writing it could harm what dinov3geo did not create.

    Refused: a file at that path, a folder that is (or lies inside) a folder the stages read, and an existing
    non-empty folder that dinov3geo did not create — unless it holds this pipeline's manifest (a folder of an
    earlier run, from before folders were marked). Nothing is written.

    Raises:
        OutputConflictError: naming the folder, the pipeline file and key ``outputs``.
    """
    return guard_output(pipe.outputs, _user_inputs(pipe), folder=True, kind=OUTPUTS_KIND,
                        role=f"{pipe._where()}: key 'outputs'", adopt=(pipe.manifest_path.name,), replaces=False)


def run_pipeline(
    pipeline: Pipeline | str | os.PathLike[str],
    overrides: Sequence[str] | None = None,
    *,
    force: Sequence[str] | bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] | None = print,
) -> dict[str, StageRun]:
    """Run the stages of ``pipeline`` in order, skipping those that are up to date.

    Before any stage runs, the pipeline's paths are checked (:func:`check_pipeline`), the outputs folder is
    guarded (:func:`guard_outputs_folder`), created and marked as ours, and its output lock is taken for the
    whole run (a dry run only checks).

    Args:
        pipeline: a :class:`Pipeline` or a pipeline YAML path.
        overrides: ``key=value`` overrides (only with a path).
        force: True re-runs every stage; a list of stage names re-runs those (and what depends on them).
        dry_run: only say what would run (stages after one that would run count as running too).
        echo: where the one-line progress messages go (None: silent).

    Returns:
        Per stage name, a :class:`StageRun`.

    Raises:
        PipelineError: the pipeline is invalid or its stages' paths conflict (nothing ran).
        OutputConflictError: the outputs folder is not one dinov3geo may write (nothing ran).
        OutputLockedError: another ``dinov3geo run`` is writing the same outputs folder (nothing ran).
        StageFailed: a stage raised (the earlier stages' outputs and manifest entries are kept).
    """
    from dinov3geo.utils.locks import output_lock

    pipe = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline, overrides)
    forced = {s.name for s in pipe.stages} if force is True else set(force or [])
    for f in forced:
        pipe.stage(f)  # error naming an unknown stage
    if isinstance(pipeline, Pipeline):
        check_pipeline(pipe)
    guard_outputs_folder(pipe)
    if dry_run:
        return _run_stages(pipe, forced, True, echo)
    with output_lock(pipe.outputs, what=f"run {pipe.name}"):
        guard_outputs_folder(pipe)  # again, now that no other run can change it
        pipe.outputs.mkdir(parents=True, exist_ok=True)
        if folder_kind(pipe.outputs) is None:
            mark_folder(pipe.outputs, OUTPUTS_KIND, pipeline=pipe.name)
        return _run_stages(pipe, forced, False, echo)


def _run_stages(pipe: Pipeline, forced: set[str], dry_run: bool,
                echo: Callable[[str], None] | None) -> dict[str, StageRun]:
    say = echo or (lambda _m: None)
    deps = dependencies(pipe)
    manifest = read_manifest(pipe)
    recs: dict[str, Any] = manifest["stages"]
    pending: dict[str, Any] = manifest.setdefault("pending", {})
    ran: set[str] = set()
    runs: dict[str, StageRun] = {}
    n = len(pipe.stages)
    for i, spec in enumerate(pipe.stages, 1):
        tag = f"[{i}/{n}] {spec.name} ({spec.type})"
        inputs = {p: fingerprint(p) for p in spec.inputs()}
        key = _stage_key(spec, inputs)
        rec = recs.get(spec.name)
        pend = pending.get(spec.name) if rec is None else None
        upstream = sorted(deps[spec.name] & ran)
        stale = "an earlier run of it was interrupted or failed" if pend is not None else _why_stale(spec, rec, key)
        reason = ("forced" if spec.name in forced else f"upstream stage(s) {upstream} ran" if upstream else stale)
        if not reason:
            assert rec is not None
            runs[spec.name] = StageRun(spec.name, spec.type, "skipped", rec.get("seconds"), rec.get("result"))
            say(f"{tag}: skipped (up to date)")
            continue
        ran.add(spec.name)
        if dry_run:
            runs[spec.name] = StageRun(spec.name, spec.type, "would run", reason=reason)
            say(f"{tag}: would run ({reason})")
            continue
        # start afresh when forced, when it ran before with other parameters/inputs, or when an interrupted
        # run was itself a rebuild or had other parameters/inputs; else (first run) resume what it left
        rebuild = spec.name in forced or (rec is not None and reason != "never ran") or (
            pend is not None and (bool(pend.get("rebuild")) or pend.get("key") != key))
        ctx = StageContext(pipe.name, spec.name, pipe.outputs,
                           results={k: (v.result or {}) for k, v in runs.items()},
                           statuses={k: {"type": v.type, "status": v.status, "seconds": v.seconds}
                                     for k, v in runs.items()}, rebuild=rebuild)
        ctx.statuses[spec.name] = {"type": spec.type, "status": "running", "seconds": None}
        recs.pop(spec.name, None)  # not done until it finishes
        pending[spec.name] = {"key": key, "rebuild": rebuild,
                              "started": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_manifest(pipe, manifest)
        say(f"{tag}: running ({reason})")
        t0 = time.perf_counter()
        kw = dict(spec.params)
        if spec.kind.takes_ctx:
            kw["ctx"] = ctx
        try:
            result = spec.kind.func(**kw) or {}
        except KeyboardInterrupt:
            raise
        except Exception as e:
            dt = time.perf_counter() - t0
            say(f"{tag}: FAILED after {dt:.1f} s")
            runs[spec.name] = StageRun(spec.name, spec.type, "failed", dt, reason=str(e))
            _stac_finish(pipe, i - 1, runs, say)  # describe what the stages before it made
            raise StageFailed(spec.name, spec.type, f"{type(e).__name__}: {e}") from e
        dt = time.perf_counter() - t0
        result = json.loads(json.dumps(result, default=str))
        missing = [o for o in spec.outputs() if not Path(o).exists()]
        if missing:
            runs[spec.name] = StageRun(spec.name, spec.type, "failed", dt, reason="outputs missing")
            raise StageFailed(spec.name, spec.type, f"it finished but did not write {missing}")
        recs[spec.name] = {
            "type": spec.type, "key": key, "params": spec.params, "inputs": inputs,
            "outputs": {o: fingerprint(o) for o in spec.outputs()}, "seconds": round(dt, 3),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"), "result": result,
        }
        pending.pop(spec.name, None)
        _write_manifest(pipe, manifest)
        runs[spec.name] = StageRun(spec.name, spec.type, "done", dt, result, reason)
        say(f"{tag}: done in {dt:.1f} s")
        _describe_stage(pipe, spec, tag, say, fresh=True, result=result)
        _write_run_collection(pipe, say)
    if not dry_run:
        _stac_finish(pipe, n, runs, say)
    return runs


# ------------------------------------------------------------------------------ STAC items and QGIS styles
#: stage parameters naming the model files of a product (recorded as ``dinov3geo:model`` in its STAC Item)
MODEL_PARAMS = ("model", "weights", "backbone", "chmv2_backbone", "chmv2_head")
#: the folder (inside the outputs folder) holding a run's STAC Collection
STAC_DIR = "stac"


def _stage_products(spec: StageSpec) -> list[Path]:
    """The outputs of ``spec`` that get a STAC Item (COGs, feature Zarr stores, vector files)."""
    from dinov3geo.io.stac import describable

    return [Path(o) for o in spec.outputs() if describable(o)]


def _item_id(pipe: Pipeline, product: Path) -> str:
    """The product's path relative to the outputs folder, ``/`` -> ``.`` (unique within the run)."""
    try:
        rel = product.absolute().relative_to(pipe.outputs.absolute())
    except ValueError:
        return product.name
    return rel.as_posix().replace("/", ".")


def _result_dates(result: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """``(date_before, date_after)`` of a stage result (change stages return them) when both parse as dates."""
    from dinov3geo.io.stac import parse_date

    a, b = (result or {}).get("date_before"), (result or {}).get("date_after")
    if not a or not b:
        return None
    try:
        parse_date(a, "date_before"), parse_date(b, "date_after")
    except ValueError:
        return None
    return str(a), str(b)


def _describe_stage(pipe: Pipeline, spec: StageSpec, tag: str, say: Callable[[str], None], *,
                    fresh: bool, result: Mapping[str, Any] | None = None) -> None:
    """Give each product of ``spec`` its QGIS style + GDAL statistics (rasters) and its STAC Item.

    ``fresh``: the stage has just run, so everything is rewritten; otherwise only missing or out-of-date Items
    (older than their product) are. ``result``: the stage's result (its ``date_before``/``date_after`` date
    the Items of a change stage). Never fails the run: a sidecar that cannot be written (a file dinov3geo
    did not write is in the way, an unreadable product) is reported as one line and skipped.
    """
    from dinov3geo.io.sidecars import model_files, write_sidecars
    from dinov3geo.io.stac import is_ours, item_path

    models = model_files([spec.params.get(k) for k in MODEL_PARAMS])
    todo = []
    for prod in _stage_products(spec):
        item = item_path(prod)
        if not fresh and (item.exists() or item.is_symlink()) and (
                not is_ours(item) or item.stat().st_mtime_ns >= prod.stat().st_mtime_ns):
            continue  # up to date, or not ours (said when the stage ran; left alone)
        todo.append(prod)
    write_sidecars(todo, inputs=spec.inputs(), model=models, datetime=_result_dates(result),
                   extra_properties={"dinov3geo:pipeline": pipe.name, "dinov3geo:stage": spec.name,
                                     "dinov3geo:stage_type": spec.type},
                   item_id=lambda prod: _item_id(pipe, prod), warn=lambda msg: say(f"{tag}: {msg}"))


def _write_run_collection(pipe: Pipeline, say: Callable[[str], None]) -> Path | None:
    """Write ``<outputs>/stac/collection.json`` linking the STAC Items of every stage's products (when there
    is at least one); rewritten only when it changes."""
    from dinov3geo.io.stac import is_ours, item_path, write_collection

    items = []
    for spec in pipe.stages:
        for prod in _stage_products(spec):
            item = item_path(prod)
            if item.is_file() and is_ours(item):
                items.append(item)
    if not items:
        return None
    try:
        return write_collection(items, pipe.outputs / STAC_DIR, pipe.name,
                                pipe.description or f"Products of the dinov3geo pipeline {pipe.name!r}",
                                title=f"dinov3geo pipeline {pipe.name}",
                                extra_fields={"dinov3geo:pipeline": pipe.name})
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - as for the items
        say(f"STAC collection not written: {e}")
        return None


def _stac_finish(pipe: Pipeline, upto: int, runs: Mapping[str, StageRun], say: Callable[[str], None]) -> None:
    """End of a run: Items for the products of the first ``upto`` stages that lack an up-to-date one (stages
    skipped as up to date, products of runs before Items were written), then the run's Collection."""
    n = len(pipe.stages)
    for i, spec in enumerate(pipe.stages[:upto], 1):
        run = runs.get(spec.name)
        _describe_stage(pipe, spec, f"[{i}/{n}] {spec.name} ({spec.type})", say, fresh=False,
                        result=run.result if run is not None else None)
    _write_run_collection(pipe, say)
