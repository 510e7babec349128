"""legacy-numpy: A Flower / NumPy app (legacy client_fn / server_fn API)."""
