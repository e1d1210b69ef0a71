"""Deployment: the Ray Serve app (deploy/ray) and the Knative / Kubernetes manifests (YAML only)."""
