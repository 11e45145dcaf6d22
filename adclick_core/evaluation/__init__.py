"""Evaluation: click and segmentation evaluation, metrics and the latency benchmark."""
