"""The pipeline runner on real data: ingest -> features (tiny backbone) -> report; skipping, re-running,
unknown keys, failing stages, third-party stages and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.windows import Window

from dinov3geo.cli import main as cli_main
from dinov3geo.pipelines import (
    PipelineError,
    StageFailed,
    load_pipeline,
    read_manifest,
    register_stage,
    run_pipeline,
)
from dinov3geo.pipelines.runner import fingerprint

LANDSAT = "landsat/rasterio_RGB.byte.tif"


def _crop(src_path: Path, dst: Path, row: int = 200, col: int = 250, size: int = 192, add: int = 0) -> Path:
    """A real crop of the Landsat RGB sample (``add`` shifts the values so the content changes)."""
    with rasterio.open(src_path) as src:
        w = Window(col, row, size, size)
        arr = src.read(window=w)
        prof = src.profile | {"width": size, "height": size, "transform": src.window_transform(w)}
    prof.pop("blockxsize", None), prof.pop("blockysize", None)
    prof["tiled"] = False
    arr = np.where(arr > 0, np.clip(arr.astype(int) + add, 1, 255), 0).astype("uint8")
    with rasterio.open(dst, "w", **prof) as ds:
        ds.write(arr)
    return dst


@pytest.fixture
def setup(tmp_path: Path, shared_data: Path) -> dict:
    from dinov3geo.models import build_backbone, save_backbone

    torch_model = build_backbone("vit_tiny_test")
    weights = save_backbone(torch_model, tmp_path / "tiny.dinov3geo.pt")
    img = _crop(shared_data / LANDSAT, tmp_path / "scene.tif")
    out = tmp_path / "out"
    pipe = {
        "name": "t",
        "outputs": str(out),
        "vars": {"scene": str(img), "weights": str(weights)},
        "stages": [
            {"name": "tiles", "type": "ingest", "sources": ["${scene}"], "out": "${outputs}/tiles.zarr",
             "tile_size": 64},
            {"name": "features", "type": "features", "image": "${scene}", "weights": "${weights}",
             "out": "${outputs}/feats.zarr", "window": 256, "device": "cpu", "amp": None},
            {"name": "report", "type": "report", "out": "${outputs}/report.html", "title": "test",
             "sections": [
                 {"title": "Scene", "items": [{"kind": "rgb", "path": "${scene}"},
                                              {"kind": "pca", "features": "${outputs}/feats.zarr"}]},
                 {"title": "Files", "kind": "links", "paths": ["${outputs}/feats_pca.tif",
                                                               "${outputs}/tiles.zarr"]},
             ]},
        ],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return {"path": path, "img": img, "out": out, "raw": pipe, "src": shared_data / LANDSAT}


def _status(runs: dict) -> dict[str, str]:
    return {k: v.status for k, v in runs.items()}


def test_runs_skips_and_reruns_downstream(setup: dict) -> None:
    lines: list[str] = []
    runs = run_pipeline(setup["path"], echo=lines.append)
    assert _status(runs) == {"tiles": "done", "features": "done", "report": "done"}
    out = setup["out"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "tiles in store" in html
    assert runs["tiles"].result["tiles_written"] == 9  # 192 px crop -> 3 x 3 tiles of 64
    man = read_manifest(load_pipeline(setup["path"]))
    assert set(man["stages"]) == {"tiles", "features", "report"}
    assert any("done in" in m for m in lines) and lines[0].startswith("[1/3] tiles (ingest): running")

    lines.clear()
    runs = run_pipeline(setup["path"], echo=lines.append)
    assert set(_status(runs).values()) == {"skipped"}
    assert all(m.endswith("skipped (up to date)") for m in lines)

    # a parameter of the middle stage changes: it and the report re-run, the ingestion is kept
    runs = run_pipeline(setup["path"], ["features.window=192"], echo=None)
    assert _status(runs) == {"tiles": "skipped", "features": "done", "report": "done"}

    # the input image changes: everything that reads it re-runs
    _crop(setup["src"], setup["img"], add=7)
    runs = run_pipeline(setup["path"], ["features.window=192"], echo=None)
    assert _status(runs) == {"tiles": "done", "features": "done", "report": "done"}

    # an output deleted by hand is rebuilt, and what reads it re-runs
    (out / "report.html").unlink()
    runs = run_pipeline(setup["path"], ["features.window=192"], echo=None)
    assert _status(runs) == {"tiles": "skipped", "features": "skipped", "report": "done"}

    # --force STAGE re-runs it and its dependants
    runs = run_pipeline(setup["path"], ["features.window=192"], force=["features"], echo=None)
    assert _status(runs) == {"tiles": "skipped", "features": "done", "report": "done"}


def test_dry_run_writes_nothing(setup: dict) -> None:
    runs = run_pipeline(setup["path"], dry_run=True, echo=None)
    assert set(_status(runs).values()) == {"would run"}
    assert not setup["out"].exists()


def test_failing_stage_names_itself_and_keeps_earlier_outputs(setup: dict, capsys) -> None:
    bad = ["vars.weights=" + str(setup["out"].parent / "missing.pt")]
    with pytest.raises(StageFailed, match=r"stage 'features' \(type features\) failed: .*missing\.pt"):
        run_pipeline(setup["path"], bad, echo=None)
    man = json.loads((setup["out"] / "pipeline-t.json").read_text())
    assert list(man["stages"]) == ["tiles"]  # the failed stage is not marked done
    assert (setup["out"] / "tiles.zarr").is_dir()
    rc = cli_main(["run", str(setup["path"]), "--set", bad[0]])
    assert rc == 1
    err = capsys.readouterr().err
    assert "stage 'features' (type features) failed" in err
    # the ingestion stays done: the next run picks up at the failed stage
    runs = run_pipeline(setup["path"], echo=None)
    assert _status(runs)["tiles"] == "skipped" and _status(runs)["features"] == "done"


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda p: p.update(colour="red"), r"pipe\.yaml: unknown top-level key\(s\) \['colour'\]"),
        (lambda p: p["stages"][1].update(windoww=3),
         r"pipe\.yaml: stage 'features' \(type features\): unknown parameter\(s\) \['windoww'\]"),
        (lambda p: p["stages"][0].pop("out"),
         r"stage 'tiles' \(type ingest\): missing required parameter\(s\) \['out'\]"),
        (lambda p: p["stages"][1].update(type="segment"), r"stage 'features': unknown stage type 'segment'"),
        (lambda p: p["stages"][1].update(window="big"),
         r"stage 'features' \(type features\): parameter 'window': expected an integer"),
        (lambda p: p["stages"][1].update(image="${nope}"), r"stage 'features'.*unknown variable \$\{nope\}"),
        (lambda p: p["stages"][2]["sections"][0]["items"][0].update(colormap="x"),
         r"stage 'report' \(type report\): sections\[0\] \('Scene'\) item 0 \(kind rgb\): unknown key\(s\) "
         r"\['colormap'\]"),
        (lambda p: p["stages"].append(dict(p["stages"][0])), r"stage name 'tiles' is used twice"),
        (lambda p: p["stages"][2].update(after=["later"]), r"key 'after': 'later' is not an earlier stage"),
        (lambda p: p["vars"].update(a="${b}", b="${a}"), r"cycle"),
    ],
)
def test_bad_pipelines_are_refused_naming_the_key(setup: dict, edit, pattern: str) -> None:
    raw = yaml.safe_load(setup["path"].read_text())
    edit(raw)
    setup["path"].write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineError, match=pattern):
        load_pipeline(setup["path"])


def test_overrides_and_interpolation(setup: dict) -> None:
    p = load_pipeline(setup["path"], ["features.window=256", "stages.tiles.tile_size=32", "vars.scene=x.tif"])
    assert p.stage("features").params["window"] == 256
    assert p.stage("tiles").params["tile_size"] == 32
    assert p.stage("tiles").params["sources"] == ["x.tif"] and p.stage("features").params["image"] == "x.tif"
    assert p.stage("features").params["amp"] is None
    with pytest.raises(PipelineError, match=r"--set nope.window: unknown key 'nope'"):
        load_pipeline(setup["path"], ["nope.window=3"])
    with pytest.raises(PipelineError, match="must look like key=value"):
        load_pipeline(setup["path"], ["features.window"])


def test_third_party_stage_with_context(tmp_path: Path) -> None:
    calls: list[dict] = []

    @register_stage("test_upper_text", inputs=("src",), outputs=("dst",), replace=True)
    def upper(src: str, dst: str, suffix: str = "", ctx=None) -> dict:
        """Upper-case a text file."""
        calls.append({"rebuild": ctx.rebuild, "before": sorted(ctx.results)})
        Path(dst).write_text(Path(src).read_text().upper() + suffix)
        return {"chars": len(Path(dst).read_text())}

    (tmp_path / "a.txt").write_text("abc")
    pipe = {"name": "u", "outputs": str(tmp_path / "o"), "stages": [
        {"name": "one", "type": "test_upper_text", "src": str(tmp_path / "a.txt"), "dst": "${outputs}/b.txt"},
        {"name": "two", "type": "test_upper_text", "src": "${outputs}/b.txt", "dst": "${outputs}/c.txt",
         "suffix": "!"}]}
    runs = run_pipeline(load_pipeline(pipe), echo=None)
    assert (tmp_path / "o" / "c.txt").read_text() == "ABC!" and runs["two"].result == {"chars": 4}
    assert calls == [{"rebuild": False, "before": []}, {"rebuild": False, "before": ["one"]}]
    # same content written again (small files are fingerprinted by content): still up to date
    (tmp_path / "a.txt").write_text("abc")
    assert {r.status for r in run_pipeline(load_pipeline(pipe), echo=None).values()} == {"skipped"}
    (tmp_path / "a.txt").write_text("abd")
    runs = run_pipeline(load_pipeline(pipe), echo=None)
    assert [r.status for r in runs.values()] == ["done", "done"] and calls[-1]["rebuild"] is True
    assert (tmp_path / "o" / "c.txt").read_text() == "ABD!"


def test_fingerprint_of_files_and_folders(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 10)
    a = fingerprint(f)
    f.write_bytes(b"y" * 10)
    assert fingerprint(f) != a and "sha256" in a
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "c").write_bytes(b"1")
    fa = fingerprint(d)
    (d / "sub" / "c2").write_bytes(b"2")
    fb = fingerprint(d)
    assert fa["files"] == 1 and fb["files"] == 2 and fa["tree"] != fb["tree"]
    assert fingerprint(tmp_path / "none") == {"absent": True}


def test_pretrain_stage_plans_every_stage_of_a_staged_config() -> None:
    from dinov3geo.pipelines.stages import _pretrain_outputs

    root = Path(__file__).resolve().parents[2]
    params = {"config": str(root / "pipelines" / "configs" / "pretrain_satellite.yaml"), "stage": "all",
              "store": "t.zarr", "output_dir": "runs/x"}
    assert _pretrain_outputs(params) == [f"runs/x/{s}/backbone.pth" for s in ("pretrain", "gram", "highres")]
    assert _pretrain_outputs({**params, "stage": "gram"}) == ["runs/x/backbone.pth"]
    with pytest.raises(PipelineError, match=r"unknown config key\(s\) \['optim.iters'\]"):
        _pretrain_outputs({**params, "set": {"optim.iters": 3}})
    with pytest.raises(PipelineError, match="'stage': 'warmup' is not in"):
        _pretrain_outputs({**params, "stage": "warmup"})


def test_repository_pipelines_validate() -> None:
    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "pipelines").glob("*.yaml"))  # stage configs live in pipelines/configs/
    assert {f.name for f in files} >= {"demo.yaml", "pretrain_satellite.yaml", "canopy_height_region.yaml",
                                       "deforestation.yaml"}
    for f in files:
        p = load_pipeline(f)
        assert p.stages, f


def test_cli_lists_stages_and_dry_runs(setup: dict, capsys) -> None:
    assert cli_main(["run", "--list-stages"]) == 0
    out = capsys.readouterr().out
    assert "ingest:" in out and "pretrain:" in out and "    window (default 512)" in out
    assert cli_main(["run", str(setup["path"]), "--dry-run", "--force"]) == 0
    out = capsys.readouterr().out
    assert "[1/3] tiles (ingest): would run (forced)" in out and not setup["out"].exists()


def test_pretrain_stage_runs_skips_and_restarts(tmp_path: Path, shared_data: Path) -> None:
    cfg = {
        "data": {"batch_size": 2, "num_workers": 0},
        "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 1},
        "dino": {"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "ibot": {"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "optim": {"iterations": 2},
        "train": {"log_every": 1, "health_every": 0, "progress_bar": False},
    }
    (tmp_path / "ssl.yaml").write_text(yaml.safe_dump(cfg))
    img = _crop(shared_data / LANDSAT, tmp_path / "scene.tif", size=128)
    pipe = {"name": "p", "outputs": str(tmp_path / "o"), "stages": [
        {"name": "tiles", "type": "ingest", "sources": [str(img)], "out": "${outputs}/t.zarr", "tile_size": 64},
        {"name": "ssl", "type": "pretrain", "config": str(tmp_path / "ssl.yaml"), "store": "${outputs}/t.zarr",
         "output_dir": "${outputs}/run"},
        {"name": "report", "type": "report", "out": "${outputs}/r.html",
         "sections": [{"title": "Losses", "kind": "loss_curves", "runs": ["${outputs}/run"]}]},
    ]}
    runs = run_pipeline(load_pipeline(pipe), echo=None)
    assert [r.status for r in runs.values()] == ["done", "done", "done"]
    assert runs["ssl"].result["runs"][0]["iterations"] == 2
    assert (tmp_path / "o" / "run" / "backbone.pth").exists()
    html = (tmp_path / "o" / "r.html").read_text()
    assert "pretraining iterations" in html and html.count("data:image/png") == 1
    assert [r.status for r in run_pipeline(load_pipeline(pipe), echo=None).values()] == ["skipped"] * 3
    pipe["stages"][1]["set"] = {"optim.iterations": 3}
    runs = run_pipeline(load_pipeline(pipe), echo=None)
    assert [r.status for r in runs.values()] == ["skipped", "done", "done"]
    assert runs["ssl"].result["runs"][0]["iterations"] == 3
    assert (tmp_path / "o" / "run.previous" / "backbone.pth").exists()  # the old run, moved aside
