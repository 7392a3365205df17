"""geoswc: global-scale image geolocation with Search within Cell.

The pipeline reads left to right through the subpackages::

    geoswc.data -> geoswc.geocells -> geoswc.classifiers -> geoswc.retrieval -> geoswc.swc -> geoswc.eval

`geoswc.Geolocator` composes the trained parts into one model folder.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "Geolocator"]


def __getattr__(name):
    # The Geolocator pulls in torch and timm; keep `import geoswc` (and `geoswc --help`) light.
    if name == "Geolocator":
        from geoswc.geolocator import Geolocator

        return Geolocator
    raise AttributeError(f"module 'geoswc' has no attribute {name!r}")
