"""Cluster tooling: a local multi-node Ray cluster (:mod:`cluster.local`, ``python -m cluster.local``)
with, if asked, an MLflow server (:mod:`cluster.mlflow_server`) on a PostgreSQL
(:mod:`cluster.postgres`); a Ray cluster-launcher YAML for AWS, KubeRay manifests, an MLflow
server for Kubernetes and a Slurm script, which are deployment files.

The package does not import :mod:`cluster.local` itself, so ``python -m cluster.local`` runs
it exactly once."""
