"""The sphere every component measures great-circle distances on: radius R = 6371 km.

The evaluation protocol (Kordopatis-Zilos et al., ICMR 2021, section 4.3) and the published peers it compares
with (Im2GPS, PlaNet, CPlaNet, Müller-Budack et al.) use the mean Earth radius of 6371 km. The synthetic
world, the clustering of Search within Cell and the scores share this one value, so a kilometre means the
same thing from the data to the report.
"""

EARTH_RADIUS_KM = 6371.0

__all__ = ["EARTH_RADIUS_KM"]
