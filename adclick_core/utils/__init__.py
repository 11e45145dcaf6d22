"""Utilities: checkpoints, errors and MVTec-style data folders."""
