"""Training machinery shared by every training script: YAML/CLI config, data arrays, atomic checkpoints, resume."""
