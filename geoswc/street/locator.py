"""Street-scale placing: a photo goes to its first database match, or to the centre of the largest cluster of
its first k matches (Search within Cell's DBSCAN, ICMR 2021 section 3.4, with eps in metres on UTM
coordinates), in a model folder that ``geoswc vpr index`` wrote (``vpr.json``, ``vpr_index/``, ``photos.csv``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np

from geoswc.data.vpr import PHOTO_SUFFIXES
from geoswc.retrieval.index import BackgroundIndex
from geoswc.street.embed import Embedder
from geoswc.street.model import VPR_JSON, LoadedVPR, from_folder

if TYPE_CHECKING:
    import pandas as pd

INDEX_DIR = "vpr_index"
PHOTOS_CSV = "photos.csv"


def is_street_model(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` is a model folder written by ``geoswc vpr index``."""
    folder = Path(folder)
    return (folder / VPR_JSON).is_file() and (folder / INDEX_DIR).is_dir() and (folder / PHOTOS_CSV).is_file()


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
        import pandas as pd  # here: the module is imported by every Geolocator, which needs no pandas

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
        self._rows_in_area(area)  # a bad area fails before any photo is read
        queries = self.embedder.descriptors([Path(p) for p in paths], desc="photos")
        return self.locate_descriptors(
            queries, [str(p) for p in paths], k=k, eps_m=eps_m, area=area, matches=matches
        )

    def locate_descriptors(
        self,
        queries: np.ndarray,
        names: Sequence[str],
        *,
        k: int = 1,
        eps_m: Optional[float] = None,
        area: Optional[Sequence[float]] = None,
        matches: int = 5,
    ) -> List[Dict[str, Any]]:
        """`locate` for photos already embedded: ``queries`` ``(N, D)`` descriptors, ``names`` their photos."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rows = self._rows_in_area(area)
        sims = queries @ self._database(rows).T
        take = min(max(int(k), int(matches)), len(rows))
        order = np.argsort(-sims, axis=1, kind="stable")[:, :take]
        utm = self.photos[["utm_east", "utm_north"]].to_numpy()
        out = []
        for i, path in enumerate(names):
            found = rows[order[i]]
            if k > 1 and eps_m:
                members = found[: int(k)][largest_cluster(utm[found[: int(k)]], eps_m)]
                lat, lon = self.photos.loc[members, ["lat", "lon"]].to_numpy().mean(axis=0)
                method = f"cluster of the first {int(k)} matches (eps {eps_m:g} m): {len(members)} photos"
            else:
                members = found[:1]
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
                            "in_cluster": bool(r in members),
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
