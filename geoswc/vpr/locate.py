"""Street-scale geolocation: index a database of geotagged photos into a model folder, place new photos.

`index_database` embeds the database of a place-recognition split (or any folder of photos with a CSV
``IMG_ID,LAT,LON``) and writes a model folder: the backbone folder files, the aggregation (``vpr.json``,
``aggregation.safetensors``, optional ``pca.safetensors``), the database index ``vpr_index/`` (a
`BackgroundIndex`, one cell) and ``photos.csv`` (``path,lat,lon,utm_east,utm_north`` with paths relative to
the database root recorded in ``vpr.json``).

`PlaceLocator` places a photo at its first match, or, with ``k > 1`` and ``eps_m``, at the centre of the
largest cluster of its first k matches (Search within Cell's DBSCAN, ICMR 2021 section 3.4, with eps in metres
on UTM coordinates); ``area`` restricts the database to a latitude/longitude box.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from geoswc.classifiers.backbone import save_backbone
from geoswc.data.vpr import read_split, split_folder, utm_of
from geoswc.retrieval.index import BackgroundIndex
from geoswc.street.embed import Embedder, init_netvlad, photo_size, train_photos
from geoswc.street.locator import INDEX_DIR, PHOTOS_CSV, PlaceLocator, largest_cluster, photo_files  # noqa: F401
from geoswc.street.model import VPR_JSON, LoadedVPR, save_vpr_parts


def _database_from_layout(root: Path, split: str) -> Tuple[Path, List[str], np.ndarray, List[Path]]:
    data = read_split(root, split, require_positives=False)
    train = train_photos(data.folder.parent / "train")
    return data.folder, data.database, data.database_latlon, train


def _database_from_csv(folder: Path, csv_path: Path) -> Tuple[Path, List[str], np.ndarray, List[Path]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"location CSV not found: {csv_path}")
    table = pd.read_csv(csv_path, dtype={"IMG_ID": str})
    missing = {"IMG_ID", "LAT", "LON"} - set(table.columns)
    if missing:
        raise ValueError(
            f"{csv_path} lacks the column(s) {', '.join(sorted(missing))}; expected IMG_ID,LAT,LON"
        )
    if table.empty:
        raise ValueError(f"{csv_path} lists no photos; nothing to index")
    latlon = table[["LAT", "LON"]].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(latlon).all(1) | (np.abs(latlon[:, 0]) > 90) | (np.abs(latlon[:, 1]) > 180)
    if bad.any():
        raise ValueError(
            f"{csv_path}: photo {table['IMG_ID'].iloc[int(np.argmax(bad))]!r} has no valid LAT/LON"
        )
    paths = [str(p) for p in table["IMG_ID"]]
    for p in paths:
        if Path(p).is_absolute() or ".." in Path(p).parts or not (folder / p).is_file():
            raise FileNotFoundError(f"photo {p!r} of {csv_path} is not a file inside {folder}")
    return folder, paths, latlon, [folder / p for p in paths]


def index_database(
    loaded: LoadedVPR,
    source: Union[str, Path],
    out: Union[str, Path],
    *,
    split: str = "test",
    csv_path: Optional[Union[str, Path]] = None,
    size: Optional[Tuple[int, int]] = None,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
) -> Dict[str, Any]:
    """Embed a database and write a model folder ``out`` that `PlaceLocator` loads; returns its summary."""
    source, out = Path(source), Path(out)
    if csv_path is None:
        try:
            split_folder(source, split)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{source} has neither the place-recognition layout (images/{split}/database) nor a --csv "
                "IMG_ID,LAT,LON listing its photos"
            ) from None
        root, paths, latlon, train = _database_from_layout(source, split)
    else:
        root, paths, latlon, train = _database_from_csv(source, Path(csv_path))
    if not np.isfinite(latlon).all():
        raise ValueError(f"photos of {root} have no latitude/longitude in their names (nor a UTM zone)")
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new model folder")
    size = tuple(size) if size else photo_size(root / paths[0])
    embedder = Embedder(loaded, size=size, batch_size=batch_size, device=device, progress=progress)
    if not loaded.spec.trained_aggregation:
        init_netvlad(embedder, train, seed=seed)
        loaded.spec.trained_aggregation = loaded.spec.pool != "avg"
    descriptors = embedder.descriptors([root / p for p in paths], desc="database")
    utm, zone, letter = utm_of(latlon)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_backbone(
            loaded.net.backbone,
            tmp,
            name=loaded.spec.backbone,
            fingerprint="vpr",
            data_config=loaded.data_config,
        )
        save_vpr_parts(tmp, loaded)
        meta = json.loads((tmp / VPR_JSON).read_text())
        meta.update(
            {"database_root": str(root.resolve()), "resize": list(size), "zone": zone, "letter": letter}
        )
        (tmp / VPR_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        BackgroundIndex(dtype="float32").build(
            descriptors,
            cell_idx=np.zeros(len(paths), np.int64),
            latlon=latlon,
            ids=[str(i) for i in range(len(paths))],
            n_cells=1,
            fingerprint="vpr",
            directory=tmp / INDEX_DIR,
        )
        pd.DataFrame(
            {
                "path": paths,
                "lat": latlon[:, 0],
                "lon": latlon[:, 1],
                "utm_east": utm[:, 0],
                "utm_north": utm[:, 1],
            }
        ).to_csv(tmp / PHOTOS_CSV, index=False)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"photos": len(paths), "dim": int(descriptors.shape[1]), "root": str(root), "out": str(out)}
