"""Models released in other formats, converted into geoswc model folders (``geoswc import``).

visloc  the ICMR 2021 authors' release (EfficientNet-B4, MvMF head, residual retrieval module, background)
"""
