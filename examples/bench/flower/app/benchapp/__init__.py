"""Synthetic-update Flower benchmark app."""
