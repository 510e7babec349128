"""plain-noop: the Flower deployment engine's floor, with no model and no data."""
