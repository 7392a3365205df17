"""Tagging photo archives: the run (`tag_photos`, ``geoswc tag``), its rows and review options, the output
writers and run records, the embedding journal and near-duplicate groups (`geoswc similar`), and GPS EXIF copies.

    run          tag_photos / tag_rows: photos -> one row each, resumable, multi-process
    output       the CSV / JSON Lines / Parquet / GeoJSON writers, the run record and lock
    similar      the embedding journal kept beside an output, duplicate groups, ``geoswc similar``
    exif_copies  copies of photos with the predicted position written into their GPS EXIF
"""

import importlib

# Public name -> the module that defines it; loaded on first use so `import geoswc.tagging` stays light.
_API = {
    "tag_photos": "geoswc.tagging.run",
    "tag_rows": "geoswc.tagging.run",
    "ReviewOptions": "geoswc.tagging.run",
    "prediction_row": "geoswc.tagging.run",
    "with_cell_centres": "geoswc.tagging.run",
}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'geoswc.tagging' has no attribute {name!r}")
