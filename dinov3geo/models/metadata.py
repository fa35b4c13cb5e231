"""Sensor / provenance metadata stored with dinov3geo checkpoints (:class:`BackboneMetadata`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneMetadata:
    """What a backbone expects as input and where its weights come from.

    Attributes:
        bands: band names in input-channel order, e.g. ``["red", "green", "blue"]``.
        mean / std: per-band normalisation applied to ``[0, 1]``-scaled inputs (same length as ``bands``).
        gsd: ground sample distance in metres of the imagery the weights were trained/adapted on, if known.
        provenance: free-form primitive-typed info (source checkpoint, arch, training run, licence...).
    """

    bands: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    gsd: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bands is not None:
            self.bands = [str(b) for b in self.bands]
            if len(set(self.bands)) != len(self.bands):
                raise ValueError(f"duplicate band names in {self.bands}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            values = [float(v) for v in values]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite, got {values}")
            if self.bands is not None and len(values) != len(self.bands):
                raise ValueError(f"{name} has {len(values)} entries but there are {len(self.bands)} bands")
            setattr(self, name, values)
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if self.gsd is not None:
            self.gsd = float(self.gsd)
            if not self.gsd > 0:
                raise ValueError(f"gsd must be positive, got {self.gsd}")
        self.provenance = dict(self.provenance)

    @property
    def num_bands(self) -> int | None:
        """Number of input channels described, if any field tells it."""
        for seq in (self.bands, self.mean, self.std):
            if seq is not None:
                return len(seq)
        return None

    def check_channels(self, in_chans: int) -> None:
        """Raise ``ValueError`` if the metadata describes a different number of channels than ``in_chans``."""
        n = self.num_bands
        if n is not None and n != in_chans:
            raise ValueError(f"metadata describes {n} bands but the model has in_chans={in_chans}")

    def to_dict(self) -> dict[str, Any]:
        """Primitive-typed dict (JSON and ``weights_only`` safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BackboneMetadata:
        """Build from :meth:`to_dict` output; unknown keys are kept under ``provenance['extra']``."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {k: data.pop(k) for k in list(data) if k not in names}
        meta = cls(**data)
        if extra:
            meta.provenance.setdefault("extra", extra)
        return meta
