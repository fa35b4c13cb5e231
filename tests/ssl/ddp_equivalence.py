"""Helper of ``tests/ssl/test_ddp.py`` (not a test module): one pretraining run through :func:`pretrain` that saves
every rank's final state.

``python tests/ssl/ddp_equivalence.py ddp STORE OUT [PRECISION]`` trains with Lightning's DDP on 2 CPU processes (gloo);
Lightning's launcher re-runs this script for rank 1, and each rank writes its final ``state_dict`` (student,
EMA teacher, heads, loss buffers) to ``OUT/rank<r>.pt``. :func:`run` with ``mode="single"`` trains one process
on the merged global batch instead (``OUT/single.pt``). Everything else is the engine's own code path: config,
schedules (same global batch size, so the same LR), manual optimisation, per-module clipping, fused AdamW, EMA.

What makes the two runs comparable:

* the data: the engine's :class:`~dinov3geo.ssl.data.IterationSampler` gives rank ``r`` of ``W`` the global
  positions ``(it * W + r) * B + j``, so the two ranks' batches of an iteration are exactly the global batch of
  ``2 * B`` samples a one-process run would draw (same tiles, same crops: augmentations are seeded by tile).
  The iBOT masks, however, are drawn per collated batch (mask ratios spread over the batch, seeded by its
  indices), so the single run is fed the two ranks' collated batches concatenated (:func:`merge_batches`)
  rather than one batch of ``2 * B`` collated by the engine;
* KoLeo (non-distributed, the default) looks for nearest neighbours within each rank's local batch; the single
  run computes it per half (:class:`PerRankKoLeo`) -- the DINO Sinkhorn-Knopp and the iBOT normalisation are
  reduced across ranks by the engine itself;
* randomness: the per-step RNG is seeded per rank, so the RoPE coordinate rescaling of the student is switched
  off (``rope_rescale_coords: null``; drop-path is 0 by default): the forward passes are then deterministic;
* precision: float64 (Lightning's ``64-true``, patched in here: the engine offers 32-bit and bf16 only); the
  DDP and one-process weights then agree to ~1.5e-7 after 3 steps that move them by up to 3e-3. In float32 (pass
  ``32-true``) the ranks are still bitwise identical, but DDP and one process differ by up to 3.5e-4: AdamW's
  first steps divide each gradient element by its own magnitude, so rounding noise in near-zero gradient
  elements becomes a difference of up to the LR in that weight. Every float32 run -- DDP, one process with one
  thread, with two threads -- lies equally far (max 2e-3, mean 3.4e-6) from the float64 run, so the float32
  gap is rounding, not a difference of algorithm; a tolerance that covers it would be too loose to catch one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch

N_STEPS = 3
B_LOCAL = 2
WORLD = 2
HEADS = {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


def config(store: str | Path, out: str | Path, mode: str) -> dict[str, Any]:
    """The stage config of a run (``mode``: ``ddp`` or ``single``)."""
    ddp = mode == "ddp"
    return {
        "data": {"store": str(store), "batch_size": B_LOCAL if ddp else WORLD * B_LOCAL, "num_workers": 0},
        "student": {"arch": "vit_tiny_test", "overrides": {"rope_rescale_coords": None}},
        "crops": {"global_crops_size": 48, "local_crops_size": 32, "local_crops_number": 2},
        "dino": dict(HEADS), "ibot": dict(HEADS),
        "optim": {"iterations": N_STEPS, "scaling_rule": "none"},
        "schedules": {"lr": {"start": 1e-3, "peak": 1e-3, "end": 1e-3},
                      "momentum": {"start": 0.9, "peak": 0.9, "end": 0.9}},
        "train": {"output_dir": str(Path(out) / f"run-{mode}"), "seed": 5, "accelerator": "cpu",
                  "devices": WORLD if ddp else 1, "strategy": "ddp" if ddp else "auto", "precision": "32-true",
                  "progress_bar": False, "checkpoint_every": 100, "log_every": 1, "health_every": 0,
                  "keep_freed_memory": False},
    }


def _cat(batches: list[dict[str, Any]], key: str, n_crops: int) -> torch.Tensor:
    """Concatenate the ranks' crop-major ``[n_crops * B, ...]`` tensors into the global crop-major tensor."""
    return torch.cat([b[key].unflatten(0, (n_crops, -1)) for b in batches], 1).flatten(0, 1)


def merge_batches(batches: list[dict[str, Any]], n_local: int) -> dict[str, Any]:
    """The global batch made of the ranks' collated batches (crop-major order kept, iBOT indices recomputed)."""
    out: dict[str, Any] = {}
    for key in batches[0]:
        if key.startswith("collated_global") or key.startswith("collated_gram") or key == "collated_masks":
            out[key] = _cat(batches, key, 2)
        elif key.startswith("collated_local"):
            out[key] = _cat(batches, key, n_local)
        elif key == "indices":
            out[key] = torch.cat([b[key] for b in batches])
        elif key in ("global_crops_size", "local_crops_size"):
            out[key] = batches[0][key]
    masks = out["collated_masks"]
    counts = masks.sum(-1).clamp(min=1).float()
    out["mask_indices_list"] = masks.flatten().nonzero().flatten()
    out["masks_weight"] = (1 / counts).unsqueeze(-1).expand_as(masks)[masks]
    out["n_masked_patches"] = torch.tensor([int(masks.sum())])
    out["upperbound"] = sum(int(b["upperbound"]) for b in batches)
    return out


class MergedLoader:
    """The batches the ``WORLD`` ranks would load at each iteration, merged into one global batch."""

    def __init__(self, cfg: Any, start_iteration: int) -> None:
        import copy

        self.cfg = copy.deepcopy(cfg)
        self.cfg.data.batch_size = B_LOCAL
        self.start = start_iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from dinov3geo.ssl.data import build_dataloader

        loaders = [iter(build_dataloader(self.cfg, start_iteration=self.start, rank=r, world_size=WORLD)[0])
                   for r in range(WORLD)]
        while True:
            yield merge_batches([next(it) for it in loaders], self.cfg.crops.local_crops_number)


class PerRankKoLeo(torch.nn.Module):
    """KoLeo as each DDP rank computes it (nearest neighbours within its own local batch), on the global batch."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.inner(c) for c in x.chunk(WORLD)) / WORLD


def run(mode: str, store: str | Path, out: str | Path, precision: str = "64-true") -> None:
    """Train ``N_STEPS`` iterations (see the module docstring) and save each rank's initial and final states
    under ``out``; ``precision``: ``64-true`` or ``32-true``."""
    from dinov3geo.ssl import train
    from dinov3geo.ssl.config import load_config

    out = Path(out)
    base = train.SSLModule

    class Saving(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            if mode == "single":
                self.model.koleo_loss = PerRankKoLeo(self.model.koleo_loss)
            self._initial: dict[str, torch.Tensor] = {}

        def on_train_start(self) -> None:
            self._initial = {k: v.detach().clone() for k, v in self.state_dict().items()}

        def on_train_end(self) -> None:
            name = f"rank{self.global_rank}.pt" if mode == "ddp" else "single.pt"
            sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
            torch.save({"state": sd, "initial": self._initial, "steps": int(self.global_step),
                        "world": int(self.trainer.world_size)}, out / name)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(train, "SSLModule", Saving))
        if mode == "single":
            def loader(dm: Any) -> MergedLoader:
                return MergedLoader(dm.cfg, int(dm.trainer.global_step))

            stack.enter_context(mock.patch.object(train.SSLDataModule, "train_dataloader", loader))
        elif mode != "ddp":
            raise ValueError(f"mode must be ddp or single, got {mode!r}")
        if precision == "64-true":
            stack.enter_context(mock.patch.object(train, "_precision", lambda cfg: "64-true"))
            stack.enter_context(mock.patch.object(train, "lightning_precision", lambda p: p))
            stack.enter_context(mock.patch.object(train, "param_dtype", lambda p: None))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train.pretrain(load_config(config(store, out, mode)))
        finally:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    run(*sys.argv[1:5])
