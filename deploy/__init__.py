"""Running campaigns on a real Ray cluster: the Ray job entrypoint (see deploy/README.md)."""
