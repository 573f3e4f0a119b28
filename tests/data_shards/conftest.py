"""Fixtures shared by the data_shards tests."""
import pytest

from data_shards import read_manifest, write_dataset
from tests.data_shards.test_data_layouts import make_folder


@pytest.fixture(scope="module")
def shards(request, tmp_path_factory):
    """Class folders of JPEGs, (classes, images per class) = the test module's FOLDER, written as a train split
    twice: in 12 kB shards (root / "many", 5 or more) and in a single shard (root / "one"). Returns the root."""
    classes, per_class = request.module.FOLDER
    root = tmp_path_factory.mktemp("folder-shards")
    src = make_folder(str(root / "src"), classes=classes, per_class=per_class)
    write_dataset("folder", src, root / "many", train_fraction=1.0, shard_size="12kB", progress=False)
    write_dataset("folder", src, root / "one", train_fraction=1.0, shard_size="1GB", progress=False)
    assert len(read_manifest(root / "many" / "train").shards) >= 5
    assert len(read_manifest(root / "one" / "train").shards) == 1
    return root
