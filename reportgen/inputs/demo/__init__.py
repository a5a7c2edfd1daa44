"""Offline demo assets: a synthetic "shapes" image folder and two small models trained on it."""
