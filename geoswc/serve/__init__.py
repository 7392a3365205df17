"""``geoswc serve``: a web app and an HTTP API over a model folder (thesis 4.2.10.4).

`create_app` (``geoswc.serve.app``) builds the FastAPI application around a loaded `Geolocator`;
`geoswc.serve.batching.DynamicBatcher` lets concurrent requests share forward passes; the page, Leaflet and
the offline Natural Earth basemap ship in ``static/`` and ``geoswc.data``. docs/serving.md describes the API.
"""

from geoswc.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
