"""Launchers: torchrun single- and multi-node (`python -m launch.torchrun`), SLURM batch scripts, DeepSpeed configs."""
