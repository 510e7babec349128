"""Docker Swarm: the Plan as a stack file, deployed across the swarm's nodes.

    render.py   describe: SwarmOptions, StackRenderer (Plan -> stack file, create-secrets.sh; pure, no engine)
    engine.py   talk: the docker CLI (`Docker`), the swarm's nodes, placement checks, task states
    target.py   act: SwarmTarget (deploy, device states, logs, exit codes, remove)
    cli.py      `flotilla cluster nodes`
"""

from flotilla.targets.swarm.render import SwarmOptions
from flotilla.targets.swarm.target import SwarmTarget

__all__ = ["SwarmOptions", "SwarmTarget"]
