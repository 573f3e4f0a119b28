"""Tests of data_shards/: layouts, shard format, streams, sampler, transforms (CPU and GPU), integrity."""
