"""The loop every trainer shares: steps, resume by identity, checkpoints and their files."""
