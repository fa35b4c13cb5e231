"""Losses in a real 2-process gloo group versus the same losses on the concatenated batch in one process."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3geo.ssl import distributed
from dinov3geo.ssl.losses import DINOLoss, KoLeoLoss, KoLeoLossDistributed, iBOTPatchLoss

pytestmark = pytest.mark.distributed

WORLD = 2
K = 6
TEMP = 0.07
# DINO: 2 x 5 teacher rows (e.g. 2 crops x local batch); iBOT: ranks hold different numbers of patches.
DINO_ROWS = 5
IBOT_ROWS = (5, 7)
KOLEO_LOCAL = 4
KOLEO_DIM = 5


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {
        "dino": torch.randn(WORLD * DINO_ROWS, K, generator=gen),
        "ibot": torch.randn(sum(IBOT_ROWS), K, generator=gen),
        "koleo": torch.randn(WORLD * KOLEO_LOCAL, KOLEO_DIM, generator=gen),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        x = _inputs()
        res: dict[str, Any] = {"world_size": distributed.get_world_size(), "rank": distributed.get_rank()}

        dino_local = x["dino"][rank * DINO_ROWS : (rank + 1) * DINO_ROWS]
        res["dino_sk"] = DINOLoss(K).sinkhorn_knopp_teacher(dino_local, teacher_temp=TEMP)

        start = sum(IBOT_ROWS[:rank])
        ibot_local = x["ibot"][start : start + IBOT_ROWS[rank]]
        n_local = torch.tensor([IBOT_ROWS[rank]], dtype=torch.long)
        res["ibot_sk"] = iBOTPatchLoss(K).sinkhorn_knopp_teacher(
            ibot_local, teacher_temp=TEMP, n_masked_patches_tensor=n_local
        )
        res["ibot_count_after"] = int(n_local.item())

        koleo_local = x["koleo"][rank * KOLEO_LOCAL : (rank + 1) * KOLEO_LOCAL]
        for name, kwargs in {
            "global": {},
            "local_group": {"loss_group_size": KOLEO_LOCAL},
            "top2": {"topk": 2},
        }.items():
            inp = koleo_local.clone().requires_grad_(True)
            loss = KoLeoLossDistributed(**kwargs)(inp)
            loss.backward()
            res[f"koleo_{name}"] = loss.detach()
            res[f"koleo_{name}_grad"] = inp.grad

        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("gloo")
    ctx = mp.start_processes(
        _worker,
        args=(str(tmp / "init"), str(tmp)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    try:
        finished = False
        for _ in range(12):  # up to ~120 s
            if ctx.join(timeout=10):
                finished = True
                break
        if not finished:
            pytest.fail("2-process gloo workers did not finish in time")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_group_is_real(rank_results: list[dict[str, Any]]) -> None:
    assert [r["world_size"] for r in rank_results] == [WORLD, WORLD]
    assert [r["rank"] for r in rank_results] == [0, 1]
    assert not dist.is_initialized()  # the parent stays single-process


def test_dino_sinkhorn_two_ranks_equals_concatenated(rank_results: list[dict[str, Any]]) -> None:
    got = torch.cat([r["dino_sk"] for r in rank_results])
    expected = DINOLoss(K).sinkhorn_knopp_teacher(_inputs()["dino"], teacher_temp=TEMP)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # Sanity: the result differs from per-rank (non-reduced) Sinkhorn-Knopp.
    local_only = DINOLoss(K).sinkhorn_knopp_teacher(_inputs()["dino"][:DINO_ROWS], teacher_temp=TEMP)
    assert not torch.allclose(rank_results[0]["dino_sk"], local_only, atol=1e-4)


def test_ibot_sinkhorn_two_ranks_unequal_counts_equals_concatenated(
    rank_results: list[dict[str, Any]],
) -> None:
    got = torch.cat([r["ibot_sk"] for r in rank_results])
    total = torch.tensor([sum(IBOT_ROWS)])
    expected = iBOTPatchLoss(K).sinkhorn_knopp_teacher(
        _inputs()["ibot"], teacher_temp=TEMP, n_masked_patches_tensor=total
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # The caller's count tensor is left untouched.
    assert [r["ibot_count_after"] for r in rank_results] == list(IBOT_ROWS)


def test_koleo_distributed_global_group_equals_concatenated(rank_results: list[dict[str, Any]]) -> None:
    x = _inputs()["koleo"].clone().requires_grad_(True)
    single = KoLeoLoss()(x)
    single.backward()
    mean_of_ranks = torch.stack([r["koleo_global"] for r in rank_results]).mean()
    torch.testing.assert_close(mean_of_ranks, single.detach(), rtol=1e-6, atol=1e-7)
    # Each rank backpropagates its own loss; the all-gather sums gradients across ranks, so a rank's input
    # gradient is d(loss_0 + loss_1)/dx_r = WORLD * d(single)/dx_r.
    got_grad = torch.cat([r["koleo_global_grad"] for r in rank_results])
    assert x.grad is not None
    torch.testing.assert_close(got_grad, WORLD * x.grad, rtol=1e-5, atol=1e-7)


def test_koleo_distributed_local_group_equals_per_rank_koleo(rank_results: list[dict[str, Any]]) -> None:
    xs = _inputs()["koleo"].split(KOLEO_LOCAL)
    for r, res in enumerate(rank_results):
        torch.testing.assert_close(res["koleo_local_group"], KoLeoLoss()(xs[r]), rtol=1e-6, atol=1e-7)


def test_koleo_distributed_topk_equals_single_process(rank_results: list[dict[str, Any]]) -> None:
    single = KoLeoLossDistributed(topk=2)(_inputs()["koleo"])
    mean_of_ranks = torch.stack([r["koleo_top2"] for r in rank_results]).mean()
    torch.testing.assert_close(mean_of_ranks, single, rtol=1e-6, atol=1e-7)
