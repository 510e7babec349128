"""The compose target: a Plan as a Docker Compose project on this host, driven with `docker compose`.

    render.py   describe: Plan -> compose.yaml + monitoring provisioning (pure, no engine)
    engine.py   talk: the Compose CLI and the engine calls about a project's containers
    target.py   act: ComposeTarget (up, device states, logs, exit codes, down)
"""

from flotilla.targets.compose.target import ComposeTarget

__all__ = ["ComposeTarget"]
