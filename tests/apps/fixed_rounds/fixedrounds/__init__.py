"""fixed-rounds: A Flower / NumPy app whose round count is fixed in code."""
