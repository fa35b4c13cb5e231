"""``benchmarks/gpu_check.py``: the smoke mode end to end (so the GPU script cannot rot between the rare moments a
GPU is available), and its part runner (budgets, failures, interrupts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ("data", "cuda_tests", "region", "torchgeo", "ssl", "data_path", "convnext")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check as mod
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return mod


def test_smoke_mode_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DINOV3GEO_CUDA_TESTS_ON_CPU")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True and doc["final"] is True and doc["device"] == "cpu"
    assert list(doc["parts"]) == list(PARTS)
    for name, part in doc["parts"].items():
        assert part["status"] == "ok", (name, part["message"], part["data"].get("traceback"))
        assert part["rows"] and 0 < part["seconds"] <= part["budget_s"], name
    # the table on stdout names every part with its status
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    for name, part in doc["parts"].items():
        assert any(ln.startswith(f"| {part['title']} ") and "| ok" in ln for ln in table), name
    # measured numbers, not placeholders
    tests = doc["parts"]["cuda_tests"]["data"]["counts"]
    assert sum(tests.values()) > 0 and tests["failed"] == 0 and tests["error"] == 0
    assert tests["passed"] + tests["skipped"] == sum(tests.values())
    region = doc["parts"]["region"]["data"]
    assert region["ratio"] > 0 and region["km2_per_min_at_0_6m"] > 0
    assert region["engine"][0]["stats"]["windows_run"] == region["model_only"][0]["windows"]  # the same windows
    assert doc["parts"]["torchgeo"]["data"]["engine_speedup"] > 0
    assert doc["parts"]["torchgeo"]["data"]["torchgeo"]["missing_px"] == 0
    variants = doc["parts"]["ssl"]["data"]["variants"]
    assert set(variants) == {"no Gram", "with Gram"} and variants["with Gram"]["engine"]["gram_loss_logged"]
    assert all(v["engine"]["s_per_it"] > 0 and v["floor"]["s_per_it"] > 0 for v in variants.values())
    assert doc["parts"]["data_path"]["data"]["engine_speedup"] > 0
    runs = doc["parts"]["convnext"]["data"]["runs"]
    assert {r["setting"] for r in runs} == {"channels-last fp32 (default)", "NCHW fp32", "channels-last bf16",
                                            "NCHW bf16"} and all(r["img_s_fastest"] > 0 for r in runs)
    assert all(r["max_abs_dev_vs_fp32_nchw"] < 1e-4 for r in runs if not r["bf16"])  # fp32 layouts agree
    assert "gpu" in doc["env"] and doc["env"]["gpu"]["cuda_available"] is False
    assert not Path(doc["work"]).exists()  # the generated data is removed


def test_part_runner_budgets_failures_and_interrupts(gpu_check):
    calls: list[str] = []

    def ok(budget, res):
        calls.append("ok")
        assert 0 < budget.left() <= 5
        res.rows.append(["done", "-"])

    def too_long(budget, res):
        calls.append("too_long")
        budget.need(60, "a big step")
        res.rows.append(["not reached", "-"])

    def partial(budget, res):
        calls.append("partial")
        res.rows.append(["first step measured", "-"])
        budget.need(60, "the second step")

    def broken(budget, res):
        calls.append("broken")
        res.data["measured"] = 1.0
        raise ValueError("first line\nmore\nlast line")

    def stopped(budget, res):
        calls.append("stopped")
        raise KeyboardInterrupt

    def never(budget, res):
        calls.append("never")

    seen: list[int] = []
    names = ["ok", "too_long", "partial", "broken", "stopped", "never"]
    fns = [ok, too_long, partial, broken, stopped, never]
    res = gpu_check.run_parts(list(zip(names, fns, strict=True)), dict.fromkeys(names, 5.0), time.monotonic() + 100,
                              on_done=lambda rs: seen.append(sum(r.status != "not run" for r in rs)))
    assert calls == names[:5]  # nothing runs after an interrupt
    assert [r.status for r in res] == ["ok", "skipped", "cut", "failed", "interrupted", "not run"]
    assert res[0].rows == [["done", "-"]] and res[1].rows == []
    assert "a big step needs ~60.0 s" in res[1].message
    assert res[2].rows == [["first step measured", "-"]] and "the second step needs ~60.0 s" in res[2].message
    assert res[3].message == "ValueError: first line ... last line" and "Traceback" in res[3].data["traceback"]
    assert res[3].data["measured"] == 1.0  # what a part measured before failing is kept
    assert "interrupted" in res[5].message
    assert seen == [1, 2, 3, 4]  # the JSON is rewritten after every finished part
    # the global deadline cuts the parts that follow it
    late = gpu_check.run_parts([("ok", ok)], {"ok": 5.0}, time.monotonic() - 1)
    assert late[0].status == "skipped" and "global time limit" in late[0].message
    rows = gpu_check.table_rows(res)
    assert [r[0] for r in rows if r[0]] == names and rows[2][1].startswith("cut: budget spent")


def test_no_gpu_without_smoke_says_so_and_still_reports(gpu_check, tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the full check would run")
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "g.json"
    assert gpu_check.main(["--json", str(out), "--parts", "region"]) == 2
    doc = json.loads(out.read_text())
    assert [p["status"] for p in doc["parts"].values()] == ["skipped", "skipped"]  # data is added for region
    assert "no CUDA GPU" in doc["parts"]["region"]["message"]
    assert "| 2 region: engine vs model alone | skipped" in capsys.readouterr().out
