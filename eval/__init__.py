"""Evaluation protocol: great-circle accuracy at fixed radii, median error, benchmark loaders, reports."""
