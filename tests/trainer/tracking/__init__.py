"""Tests of trainer/tracking: the MLflow tracker, its server, concurrent runs and proxy statistics over ranks."""
