"""Reading weights: factored QK/OV circuits, SVD directions read through the vocabulary, outlier dimensions,
logit and tuned lens."""
