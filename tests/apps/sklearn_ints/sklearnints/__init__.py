"""sklearn-ints: A Flower / scikit-learn app (Message API)."""
