"""Cluster tooling: a local multi-node Ray cluster (:mod:`cluster.local`, ``python -m cluster.local``),
a Ray cluster-launcher YAML for AWS, KubeRay manifests, an MLflow server for Kubernetes and a
Slurm script. Only :mod:`cluster.local` is Python; the rest are deployment files.

The package does not import :mod:`cluster.local` itself, so ``python -m cluster.local`` runs
it exactly once."""
