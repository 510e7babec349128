"""secagg-numpy: SecAgg+ over a NumPy model."""
