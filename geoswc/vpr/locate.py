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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from geoswc.classifiers.backbone import save_backbone
from geoswc.data.vpr import PHOTO_SUFFIXES, read_split, split_folder, utm_of
from geoswc.retrieval.index import BackgroundIndex
from geoswc.vpr.embed import Embedder, init_netvlad, photo_size, train_photos
from geoswc.vpr.model import VPR_JSON, LoadedVPR, from_folder, save_vpr_parts

INDEX_DIR = "vpr_index"
PHOTOS_CSV = "photos.csv"


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


def largest_cluster(utm: np.ndarray, eps_m: float) -> np.ndarray:
    """Indices of the largest DBSCAN cluster (min_samples 1) of points in metres; ties go to the cluster of the
    first point (the best match)."""
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=float(eps_m), min_samples=1).fit_predict(utm)
    counts = np.bincount(labels)
    best = labels[0] if counts[labels[0]] == counts.max() else int(np.argmax(counts))
    return np.flatnonzero(labels == best)


class PlaceLocator:
    """Places photos by their nearest database photos (a model folder written by `index_database`)."""

    def __init__(self, loaded: LoadedVPR, index: BackgroundIndex, photos: pd.DataFrame, meta: Dict[str, Any]):
        self.loaded, self.index, self.photos, self.meta = loaded, index, photos, meta
        self.embedder = Embedder(loaded, size=tuple(meta["resize"]), progress=False)
        self.database_root = Path(meta["database_root"])

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path]) -> "PlaceLocator":
        folder = Path(folder)
        meta_path = folder / VPR_JSON
        if not meta_path.is_file() or not (folder / INDEX_DIR).is_dir():
            raise FileNotFoundError(
                f"{folder} is not an indexed place-recognition model (no {VPR_JSON} and {INDEX_DIR}/); "
                "write one with: geoswc vpr index"
            )
        meta = json.loads(meta_path.read_text())
        photos = pd.read_csv(folder / PHOTOS_CSV, dtype={"path": str})
        index = BackgroundIndex.load(folder / INDEX_DIR, mmap=False)
        if len(index) != len(photos):
            raise ValueError(f"{folder}: {len(index)} indexed rows but {len(photos)} rows in {PHOTOS_CSV}")
        return cls(from_folder(folder), index, photos, meta)

    def _rows_in_area(self, area: Optional[Sequence[float]]) -> np.ndarray:
        if area is None:
            return np.arange(len(self.photos))
        south, west, north, east = (float(v) for v in area)
        if not (-90 <= south <= north <= 90 and -180 <= west <= 180 and -180 <= east <= 180):
            raise ValueError(
                f"area must be south,west,north,east in degrees with south <= north; got {list(area)}"
            )
        lat, lon = self.photos["lat"].to_numpy(), self.photos["lon"].to_numpy()
        inside_lon = (lon >= west) & (lon <= east) if west <= east else (lon >= west) | (lon <= east)
        rows = np.flatnonzero((lat >= south) & (lat <= north) & inside_lon)
        if len(rows) == 0:
            raise ValueError(f"no database photo lies in the area {list(area)}")
        return rows

    def locate(
        self,
        paths: Sequence[Union[str, Path]],
        *,
        k: int = 1,
        eps_m: Optional[float] = None,
        area: Optional[Sequence[float]] = None,
        matches: int = 5,
    ) -> List[Dict[str, Any]]:
        """One record per photo: ``lat``, ``lon``, ``method`` and its first ``matches`` database photos."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rows = self._rows_in_area(area)
        queries = self.embedder.descriptors([Path(p) for p in paths], desc="photos")
        sims = queries @ self._database(rows).T
        take = min(max(int(k), int(matches)), len(rows))
        order = np.argsort(-sims, axis=1, kind="stable")[:, :take]
        utm = self.photos[["utm_east", "utm_north"]].to_numpy()
        out = []
        for i, path in enumerate(paths):
            found = rows[order[i]]
            if k > 1 and eps_m:
                members = found[: int(k)][largest_cluster(utm[found[: int(k)]], eps_m)]
                lat, lon = self.photos.loc[members, ["lat", "lon"]].to_numpy().mean(axis=0)
                method = f"cluster of the first {int(k)} matches (eps {eps_m:g} m): {len(members)} photos"
            else:
                lat, lon = self.photos.loc[found[0], ["lat", "lon"]].to_numpy()
                method = "first match"
            out.append(
                {
                    "photo": str(path),
                    "lat": float(lat),
                    "lon": float(lon),
                    "method": method,
                    "matches": [
                        {
                            "path": str(self.photos.at[r, "path"]),
                            "lat": float(self.photos.at[r, "lat"]),
                            "lon": float(self.photos.at[r, "lon"]),
                            "similarity": float(sims[i, order[i][j]]),
                        }
                        for j, r in enumerate(found[: int(matches)])
                    ],
                }
            )
        return out

    def _database(self, rows: np.ndarray) -> np.ndarray:
        """Descriptors of database rows given in ``photos.csv`` order."""
        by_input = np.empty(len(self.index), np.int64)
        by_input[np.asarray(self.index.ids, dtype=np.int64)] = np.arange(len(self.index))
        return np.asarray(self.index.embeddings[by_input[rows]], dtype=np.float32)


def photo_files(inputs: Sequence[Union[str, Path]]) -> List[Path]:
    """The photo files among ``inputs`` (files, or folders searched recursively), sorted within a folder."""
    files: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"photo or folder not found: {item}")
    if not files:
        raise ValueError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return files
