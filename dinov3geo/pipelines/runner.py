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
and the outputs of the stages before it are kept.
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

#: top-level keys of a pipeline file
TOP_KEYS = ("name", "description", "outputs", "vars", "stages")
#: keys every stage may have besides its kind's parameters
STAGE_KEYS = ("name", "type", "after", "description")
#: files up to this size are fingerprinted by content, larger ones by (size, mtime_ns)
SMALL_FILE = 1 << 20
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)\}")


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
        if not path.is_file():
            raise PipelineError(f"pipeline file {str(path)!r} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise PipelineError(f"{path}: not valid YAML: {e}") from e
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
    return Pipeline(name, path, Path(str(base["outputs"])), stages, str(raw.get("description") or ""), variables)


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
            outs = prev.outputs()
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


def run_pipeline(
    pipeline: Pipeline | str | os.PathLike[str],
    overrides: Sequence[str] | None = None,
    *,
    force: Sequence[str] | bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] | None = print,
) -> dict[str, StageRun]:
    """Run the stages of ``pipeline`` in order, skipping those that are up to date.

    Args:
        pipeline: a :class:`Pipeline` or a pipeline YAML path.
        overrides: ``key=value`` overrides (only with a path).
        force: True re-runs every stage; a list of stage names re-runs those (and what depends on them).
        dry_run: only say what would run (stages after one that would run count as running too).
        echo: where the one-line progress messages go (None: silent).

    Returns:
        Per stage name, a :class:`StageRun`.

    Raises:
        StageFailed: a stage raised (the earlier stages' outputs and manifest entries are kept).
    """
    pipe = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline, overrides)
    say = echo or (lambda _m: None)
    forced = {s.name for s in pipe.stages} if force is True else set(force or [])
    for f in forced:
        pipe.stage(f)  # error naming an unknown stage
    deps = dependencies(pipe)
    manifest = read_manifest(pipe)
    recs: dict[str, Any] = manifest["stages"]
    if not dry_run:
        pipe.outputs.mkdir(parents=True, exist_ok=True)
    ran: set[str] = set()
    runs: dict[str, StageRun] = {}
    n = len(pipe.stages)
    for i, spec in enumerate(pipe.stages, 1):
        tag = f"[{i}/{n}] {spec.name} ({spec.type})"
        inputs = {p: fingerprint(p) for p in spec.inputs()}
        key = _stage_key(spec, inputs)
        rec = recs.get(spec.name)
        upstream = sorted(deps[spec.name] & ran)
        reason = ("forced" if spec.name in forced else
                  f"upstream stage(s) {upstream} ran" if upstream else _why_stale(spec, rec, key))
        if not reason:
            runs[spec.name] = StageRun(spec.name, spec.type, "skipped", rec.get("seconds"), rec.get("result"))
            say(f"{tag}: skipped (up to date)")
            continue
        ran.add(spec.name)
        if dry_run:
            runs[spec.name] = StageRun(spec.name, spec.type, "would run", reason=reason)
            say(f"{tag}: would run ({reason})")
            continue
        rebuild = spec.name in forced or (rec is not None and reason != "never ran")
        ctx = StageContext(pipe.name, spec.name, pipe.outputs,
                           results={k: (v.result or {}) for k, v in runs.items()},
                           statuses={k: {"type": v.type, "status": v.status, "seconds": v.seconds}
                                     for k, v in runs.items()}, rebuild=rebuild)
        ctx.statuses[spec.name] = {"type": spec.type, "status": "running", "seconds": None}
        recs.pop(spec.name, None)  # not done until it finishes
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
        _write_manifest(pipe, manifest)
        runs[spec.name] = StageRun(spec.name, spec.type, "done", dt, result, reason)
        say(f"{tag}: done in {dt:.1f} s")
    return runs
