"""Tagging photo archives: the run (`tag_photos`, ``geoswc tag``), its rows and review options, the output
writers and run records, the embedding journal, near-duplicate groups, ``geoswc similar``, and GPS EXIF copies.

    run          tag_photos: photos -> one row each, resumable, multi-process (its steps in order)
    rows         ReviewOptions, prediction_row, tag_rows: the row of one photo, for photos in memory too
    records      the run's identity, its record OUT.run.json, the lock OUT.lock, the resume checks
    output       the CSV / JSON Lines / Parquet / GeoJSON writers and readers, the row journals
    journal      the embeddings kept beside an output (OUT.embeddings.npy) and their per-rank journals
    duplicates   near-duplicate groups of the kept embeddings
    similar      ``geoswc similar``: the archive photos most similar to query photos
    report       the review page OUT.html
    summary      what a run did, and the lines ``geoswc tag`` prints
    exif_copies  copies of photos with the predicted position written into their GPS EXIF
    files        errors naming the file, opening without following links, reading a JSON object
"""

import importlib

# Public name -> the module that defines it; loaded on first use so `import geoswc.tagging` stays light.
# These are the names of the first `geoswc.tag` module, which `geoswc.tag` still gives.
_API = {
    "tag_photos": "geoswc.tagging.run",
    "load_predictor": "geoswc.tagging.run",
    "resize_target": "geoswc.tagging.run",
    "Ranks": "geoswc.tagging.run",
    "BATCH_DELAY_ENV": "geoswc.tagging.run",
    "tag_rows": "geoswc.tagging.rows",
    "ReviewOptions": "geoswc.tagging.rows",
    "review_fields": "geoswc.tagging.rows",
    "batch_places": "geoswc.tagging.rows",
    "prediction_row": "geoswc.tagging.rows",
    "skipped_row": "geoswc.tagging.rows",
    "with_cell_centres": "geoswc.tagging.rows",
    "run_identity": "geoswc.tagging.records",
    "RUN_RECORD_VERSION": "geoswc.tagging.records",
    "html_path": "geoswc.tagging.report",
    "TagSummary": "geoswc.tagging.summary",
    "summary_lines": "geoswc.tagging.summary",
}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'geoswc.tagging' has no attribute {name!r}")
