"""Tests of launch/: torchrun launcher, elastic restarts, container and SLURM scripts."""
