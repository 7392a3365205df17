"""Search within Cell: retrieval inside the predicted cell plus spatial clustering (paper section 3.4)."""
