"""Tests of trainer/: config, model, loop, recipe, checkpoints (torch and DCP), summary, failure paths."""
