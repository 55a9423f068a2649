"""Procedural chest CTPA phantoms."""
