"""Tests of trainer/engines: the DeepSpeed engine against DDP."""
