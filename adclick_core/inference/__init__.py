"""Inference: the predictors, click maps, zoom-in, boundary refinement, regions, box prompts and baselines."""
