"""Thin programs composed from ringattn parts: training (``python -m recipes.train``)."""
