"""The test suite: tests/<room>/ mirrors the code rooms (loss, data_shards, trainer, launch, bench)."""
