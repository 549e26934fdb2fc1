"""Metric-weighted tensor decompositions."""
