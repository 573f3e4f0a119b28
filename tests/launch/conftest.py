"""The two-node SLURM cluster (launch/local_cluster.sh), one per test session, for the `services` tests."""
import pytest


@pytest.fixture(scope="session")
def cluster(request):
    """A running two-node cluster (n1, n2 on 127.0.0.1); stopped at the end of the session, no daemon left."""
    from tests.launch.slurm_cluster import Cluster, missing, stop_on_sigterm

    reason = missing()
    if reason:
        pytest.skip(reason)
    stop_on_sigterm()
    c = Cluster()
    request.addfinalizer(c.down)
    c.up()
    return c
