"""Residual retrieval module, InfoNCE with cross-batch memory, and the background index (paper section 3.3)."""
