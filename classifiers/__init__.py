"""Backbone and classification heads that predict a photo's cell: CE, HC and MvMF (paper section 3.2)."""
