"""Models released in other formats, converted into geoswc model folders (``geoswc import``).

visloc  the ICMR 2021 authors' release (EfficientNet-B4, MvMF head, residual retrieval module, background)

What the importers read with: ``sources`` (local files, URLs downloaded only when asked, ``.pt`` state dicts
loaded without running code), ``background`` (an HDF5 background collection, checked before it is read) and
``assignments`` (background rows per component); ``staging`` builds a model folder aside and swaps it in.
"""
