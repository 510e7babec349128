"""Flotilla: federated learning on fleets of unlike devices, on the real Flower engine."""

__version__ = "0.1.0"
