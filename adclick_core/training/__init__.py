"""Training: click and segmentation training, adaptation, synthetic anomalies, textures, losses, labels, distributed runs."""
