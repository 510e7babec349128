"""torch-quickstart: A Flower / PyTorch app."""
