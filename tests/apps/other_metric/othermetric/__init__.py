"""other-metric: A Flower / NumPy app (Message API) with eval_acc / eval_loss."""
