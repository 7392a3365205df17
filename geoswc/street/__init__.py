"""Street-scale place recognition models below the Geolocator: the aggregation model, its embedder and the
locator of a database indexed by ``geoswc vpr index`` (docs/place-recognition.md)."""
