"""msg-numpy: A Flower / NumPy app (Message API)."""
