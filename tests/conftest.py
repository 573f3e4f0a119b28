"""Fixtures shared by the test rooms."""

import pytest


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The demo's digits shards (train: digits 0-4, test: 5-9), written once per test session, read-only."""
    from trainer.demo import write_digits_shards

    root = str(tmp_path_factory.mktemp("digits-shards"))
    write_digits_shards(root)
    return root
