"""Ingestion: chip satellite scenes into a Zarr v3 tile store (xarray + dask), resumably."""

from dinov3geo.ingest.ingest import IngestReport, discover_sources, ingest
from dinov3geo.ingest.stats import BandStats
from dinov3geo.ingest.store import TileStore, TileStoreError

__all__ = ["BandStats", "IngestReport", "TileStore", "TileStoreError", "discover_sources", "ingest"]
