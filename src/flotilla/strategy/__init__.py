"""Flotilla's strategies: Flower's FedAvg with fleet records, and the `auto` heterogeneity policy.

- fleet: FleetFedAvg (policies none/manual) and FleetAuto (auto), used by the built-in app;
- planner: per-device estimates and each round's work (pure);
- aggregate: FedNova over fresh and stale updates (pure);
- hetero: batch sizing, lr scaling, deadlines, FedNova weights (pure math);
- grid: FleetGrid, the grid wrapper that stops at deadlines and collects late replies;
- records: the per-device rows of a round.
"""
