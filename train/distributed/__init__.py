"""Processes: the process group, a step's randomness, and sequence-parallel groups."""
