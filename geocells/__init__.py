"""Adaptive S2 partitions of the Earth into geographic cells (paper section 3.1)."""
