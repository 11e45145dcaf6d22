"""Features: the backbone extractor, reference banks, residuals and text prompts (what the models see)."""
