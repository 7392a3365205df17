"""geoswc: global-scale image geolocation with Search within Cell.

The pipeline reads left to right through the subpackages::

    geoswc.data -> geoswc.geocells -> geoswc.classifiers -> geoswc.retrieval -> geoswc.swc -> geoswc.eval

The Python API mirrors the command line:

- `fit_model(train_csv, images=, out=, preset=, overrides=, exclude=)` trains every stage (``geoswc fit``);
- `evaluate_model(model, meta_csv, images=, out=, modes=)` scores every Table 1 mode (``geoswc evaluate``);
- `tag_photos(paths, model=, out=, ...)` geotags a photo archive (``geoswc tag``); `tag_rows(photos, model=,
  review=ReviewOptions(...))` returns the same rows for photos in memory;
- `Geolocator.from_pretrained(folder).predict(photos)` places photos in memory;
- `geoswc.train` holds the training stages as functions.
"""

import importlib

from geoswc import _moved

__version__ = "0.1.0"

_moved.install()

# Public name -> the module that defines it. They load on first use: `import geoswc` (and `geoswc --help`)
# stays light, without torch.
_API = {
    "Geolocator": "geoswc.geolocator",
    "fit_model": "geoswc.train.fit",
    "evaluate_model": "geoswc.evaluation.run",
    "tag_photos": "geoswc.tagging.run",
    "tag_rows": "geoswc.tagging.run",
    "ReviewOptions": "geoswc.tagging.run",
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'geoswc' has no attribute {name!r}")
