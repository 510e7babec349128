"""Flotilla's strategies: Flower's FedAvg with fleet records, and the `auto` heterogeneity policy.

- auto: Auto, the `auto` policy around a user's own FedAvg-family strategy (`flotilla.strategy.Auto`);
- fleet: FleetFedAvg (policies none/manual) and FleetAuto (auto), used by the built-in app;
- planner: per-device estimates and each round's work (pure);
- aggregate: FedNova over fresh and stale updates (pure);
- hetero: batch sizing, lr scaling, deadlines, FedNova weights (pure math);
- grid: FleetGrid, the grid wrapper that stops at deadlines and collects late replies;
- records: the per-device rows of a round.

`Auto` is imported lazily (it imports flwr's strategies): `import flotilla.strategy.hetero` stays light.
"""


def __getattr__(name: str):
    if name == "Auto":
        from flotilla.strategy.auto import Auto

        return Auto
    raise AttributeError(f"module 'flotilla.strategy' has no attribute {name!r}")


__all__ = ["Auto"]
