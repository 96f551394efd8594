"""Hydra config tree of fastif, installed as the package fastif.configs (read via pkg://fastif.configs)."""
