"""Kubernetes: the same Plan as manifests, run through the user's kubeconfig.

    render.py    describe: K8sOptions, K8sRenderer (Plan -> manifests, create-secrets.sh; pure, no cluster)
    cluster.py   talk: the kubernetes client (connect, create, wait, port-forward, pod states, record sync)
    target.py    act: K8sTarget (up, device states, logs, down)

The kubernetes client is imported only when a cluster is talked to.
"""

from flotilla.targets.k8s.render import K8sOptions
from flotilla.targets.k8s.target import K8sTarget

__all__ = ["K8sOptions", "K8sTarget"]
