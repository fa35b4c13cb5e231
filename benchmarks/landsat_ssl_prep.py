"""Per-scene standardised 6-band Landsat scenes for the SSL recipe of ``benchmarks/configs/landsat_ssl.yaml``.

The unlabelled Landsat 5/7 scenes of ``../shared/data`` come in two value scales: uint8 DN (stars Olinda,
Taizhou 2000 and 2003, the RStoolbox LT05 1988 band files) and surface reflectance x 10000 (the Chiapas 1999
and 2002 stacks). One tile store holds a single set of per-band statistics, so every scene is standardised
here on its own: per band, ``(value - mean) / std`` over the scene's valid pixels, written as a float32
GeoTIFF (nodata -9999) with the band names blue, green, red, nir, swir16, swir22 (ETM+/TM bands 1-5 and 7).
The land-cover benchmark feeds the backbone the same way (``--norm image``: the image's own per-band
statistics).

Valid pixels: the file's nodata (255 for the LT05 bands, -9999 for Chiapas 1999); in Chiapas 2002, values of
16000 and above (saturated / fill) are also masked. The Chiapas 1999 scene is the benchmark's own image: using
it here is self-supervised (its polygons are never read) but is said in the results (``--no-chiapas-1999``
leaves it out).

    .venv/bin/python benchmarks/landsat_ssl_prep.py --out /tmp/landsat_ssl/scenes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]
LT05 = SHARED / "landsat" / "rstoolbox_LT05_224063_1988"
CHIAPAS = SHARED / "landcover" / "ogt_landsat7_chiapas_1999_2002"
#: name -> (files, 1-based band of each file, value >= this is invalid too)
SCENES: dict[str, tuple[list[Path], list[int], float | None]] = {
    "olinda_L7": ([SHARED / "landsat" / "stars_L7_ETMs.tif"], [1, 2, 3, 4, 5, 6], None),
    "taizhou_2000_L7": ([SHARED / "change_pairs" / "landsat_taizhou" / "taizhou_2000-03-17_L7ETM.tif"],
                        [1, 2, 3, 4, 5, 6], None),
    "taizhou_2003_L7": ([SHARED / "change_pairs" / "landsat_taizhou" / "taizhou_2003-02-06_L7ETM.tif"],
                        [1, 2, 3, 4, 5, 6], None),
    "para_1988_LT5": ([LT05 / f"LT52240631988227CUB02_B{b}.TIF" for b in (1, 2, 3, 4, 5, 7)], [1] * 6, None),
    "chiapas_2002_L7": ([CHIAPAS / "LE70220492002106EDC00_stack.gtif"], [1, 2, 3, 4, 5, 6], 16000.0),
    "chiapas_1999_L7": ([CHIAPAS / "LE70220491999322EDC01_stack.gtif"], [1, 2, 3, 4, 5, 6], None),
}
NODATA = -9999.0


def standardise(name: str, out_dir: Path) -> dict[str, object]:
    """Write ``out_dir/<name>.tif``: the scene's 6 bands standardised per band over its valid pixels."""
    import rasterio

    files, idx, hi = SCENES[name]
    planes, valid, profile = [], None, None
    for k, b in enumerate(idx):
        with rasterio.open(files[0] if len(files) == 1 else files[k]) as ds:
            a = ds.read(b).astype(np.float64)
            v = np.ones(a.shape, bool) if ds.nodata is None else a != ds.nodata
            if profile is None:
                profile = ds.profile.copy()
        if hi is not None:
            v &= a < hi
        planes.append(a)
        valid = v if valid is None else valid & v
    assert profile is not None and valid is not None
    x = np.stack(planes)
    mean = x[:, valid].mean(axis=1)
    std = np.maximum(x[:, valid].std(axis=1), 1e-6)
    z = ((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    z[:, ~valid] = NODATA
    profile.update(driver="GTiff", count=6, dtype="float32", nodata=NODATA, compress="deflate", tiled=False)
    for key in ("blockxsize", "blockysize", "photometric", "interleave"):
        profile.pop(key, None)
    out = out_dir / f"{name}.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(z)
        for i, bn in enumerate(BANDS, start=1):
            dst.set_band_description(i, bn)
    return {"scene": name, "file": str(out), "shape": list(z.shape[1:]), "valid": round(float(valid.mean()), 4),
            "mean": [round(float(m), 2) for m in mean], "std": [round(float(s), 2) for s in std]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the standardised GeoTIFFs (created)")
    p.add_argument("--no-chiapas-1999", action="store_true", help="leave out the benchmark's own scene")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in SCENES if not (args.no_chiapas_1999 and n == "chiapas_1999_L7")]
    for n in names:
        print(json.dumps(standardise(n, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
