"""mnist-auto: A Flower / PyTorch app."""
