"""Multi-process training: 2-process DDP (gloo, CPU) gives the same first-step gradients as one process on the
same global batch; and a 2-device Lightning DDP run of the CLI completes."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3geo.ingest import ingest
from dinov3geo.ssl.config import load_config
from dinov3geo.ssl.data import build_dataloader
from dinov3geo.ssl.meta_arch import SSLMetaArch

B_LOCAL = 2


def _cfg(store, out):
    return load_config({
        "data": {"store": str(store), "batch_size": B_LOCAL, "num_workers": 0},
        "student": {"arch": "vit_tiny_test"},
        "crops": {"global_crops_size": 48, "local_crops_size": 32, "local_crops_number": 2},
        "dino": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "ibot": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "train": {"output_dir": str(out), "seed": 1},
    })


def _rank_batch(cfg, rank, world):
    loader, _ = build_dataloader(cfg, start_iteration=0, rank=rank, world_size=world)
    return next(iter(loader))


def _merge(batches):
    """The global batch made of the ranks' batches (crop-major order, masks re-indexed)."""
    n_g, n_l = 2, 2
    out = {}
    out["collated_global_crops"] = torch.cat([b["collated_global_crops"].unflatten(0, (n_g, B_LOCAL))
                                              for b in batches], 1).flatten(0, 1)
    out["collated_local_crops"] = torch.cat([b["collated_local_crops"].unflatten(0, (n_l, B_LOCAL))
                                             for b in batches], 1).flatten(0, 1)
    masks = torch.cat([b["collated_masks"].unflatten(0, (n_g, B_LOCAL)) for b in batches], 1).flatten(0, 1)
    out["collated_masks"] = masks
    out["mask_indices_list"] = masks.flatten().nonzero().flatten()
    counts = masks.sum(-1).clamp(min=1).float()
    out["masks_weight"] = (1 / counts).unsqueeze(-1).expand_as(masks)[masks]
    out["n_masked_patches"] = torch.tensor([int(masks.sum())])
    return out


class _PerDeviceKoLeo(torch.nn.Module):
    """KoLeo as each DDP rank computes it (neighbours within its own local batch), on the global batch."""

    def __init__(self, inner, world):
        super().__init__()
        self.inner, self.world = inner, world

    def forward(self, x):
        return sum(self.inner(c) for c in x.chunk(self.world)) / self.world


def _grads(model, data):
    # float64: at initialisation the CLS tokens of different images nearly coincide, and KoLeo's
    # -log(distance) turns float32 reduction-order noise into ~1e-3 relative gradient differences
    model.double()
    data = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in data.items()}
    torch.manual_seed(123)  # same RoPE box-jitter draws everywhere
    model.train()
    loss, _ = model.forward_losses(data, teacher_temp=0.05, iteration=0)
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.student.named_parameters() if p.grad is not None}


def _worker(rank, world, store, out, init_file, state, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = _cfg(store, out)
        model = SSLMetaArch(cfg, in_chans=3)
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model.student)
        model.student = ddp.module  # forward through the module; gradients are averaged by the hooks below
        data = _rank_batch(cfg, rank, world)
        data = {k: data[k] for k in ("collated_global_crops", "collated_local_crops", "collated_masks",
                                     "mask_indices_list", "masks_weight", "n_masked_patches")}
        grads = _grads(model, data)
        for k in sorted(grads):  # what DDP's reducer does: all-reduce and average
            dist.all_reduce(grads[k])
            grads[k] /= world
        if rank == 0:
            torch.save(grads, result_file)
        # tear down in order: every rank done, the DDP reducer (which holds the process group and gloo
        # threads) freed, then the group destroyed; a reducer collected after the group is gone aborts
        # the process ("terminate called without an active exception")
        dist.barrier()
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("ddp") / "s.zarr"
    ingest([shared_data / "aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"], out,
           tile_size=64, progress=False)
    return out


@pytest.mark.distributed
def test_two_process_first_step_gradients_equal_single_process(store, tmp_path):
    cfg = _cfg(store, tmp_path)
    torch.manual_seed(0)
    ref_model = SSLMetaArch(cfg, in_chans=3)
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref_model.koleo_loss = _PerDeviceKoLeo(ref_model.koleo_loss, 2)
    batches = [_rank_batch(cfg, r, 2) for r in range(2)]
    ref = _grads(ref_model, _merge(batches))
    init_file = tempfile.mktemp(dir=tmp_path)
    result = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, store, tmp_path, init_file, state, str(result)), nprocs=2, join=True)
    got = torch.load(result, weights_only=True)
    assert set(got) == set(ref) and len(ref) > 20
    bad = []
    for k in ref:
        d = (got[k] - ref[k]).abs().max().item()
        scale = ref[k].abs().max().item()
        if d > 1e-6 * scale + 1e-12:  # fp32 RoPE tables limit the float64 run to ~1e-7
            bad.append((k, d, scale))
    assert not bad, bad[:10]


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["32-true", "bf16-params"])
def test_lightning_ddp_two_processes_cli(store, tmp_path, precision):
    import yaml

    cfg = {"data": {"store": str(store), "batch_size": 2, "num_workers": 0},
           "student": {"arch": "vit_tiny_test"},
           "crops": {"global_crops_size": 48, "local_crops_size": 32, "local_crops_number": 2},
           "dino": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
           "ibot": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
           "optim": {"iterations": 2},
           "train": {"output_dir": str(tmp_path / "run"), "accelerator": "cpu", "devices": 2, "strategy": "ddp",
                     "progress_bar": False, "precision": precision}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DINOV3GEO_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dinov3geo", "-q", "pretrain", str(path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "backbone.pth").exists()
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 2
    # bf16-params: the fp32 master weights are what DDP averaged gradients into and what is saved
    assert all(v.dtype == torch.float32 for v in ck["state_dict"].values() if v.is_floating_point())
