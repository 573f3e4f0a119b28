"""Tests of trainer/evaluation: metrics, evaluate (one process and gloo ranks) and the evaluate CLI."""
