"""Same seed, same proxies in every mode: local, gather and sharded draw one initial table (init_proxy_rows), on any
world size, and a sharded rank draws only its own rows."""
import hashlib
import math
import time

import pytest
import torch

from loss import ProxyGML, build_criterion
from loss.proxygml import init_proxy_rows
from tests.helpers import run_on_gloo_ranks


def seed_of(seed, block):
    """Block b's generator seed: the first 8 bytes of sha256("proxygml.proxies/<seed>/<b>"), little-endian, >> 1."""
    return int.from_bytes(hashlib.sha256(f"proxygml.proxies/{seed}/{block}".encode()).digest()[:8], "little") >> 1


def reference_table(num_rows, dim, seed, block_rows):
    """The table as its definition states it, built whole: block b is U(±1/sqrt(C*N)) from seed_of(seed, b)."""
    bound = 1 / math.sqrt(num_rows)
    blocks = []
    for b in range(-(-num_rows // block_rows)):
        g = torch.Generator().manual_seed(seed_of(seed, b))
        n = min(block_rows, num_rows - b * block_rows)
        blocks.append(torch.rand(n, dim, generator=g) * (2 * bound) - bound)
    return torch.cat(blocks)


def test_any_slice_is_the_same_rows_of_one_table():
    full = reference_table(23, 3, seed=7, block_rows=5)
    for first, stop in [(0, 23), (0, 1), (4, 6), (5, 10), (3, 17), (22, 23), (9, 9)]:
        assert torch.equal(init_proxy_rows(23, 3, first, stop, 7, block_rows=5), full[first:stop]), (first, stop)
    assert not torch.equal(init_proxy_rows(23, 3, 0, 23, 8, block_rows=5), full)  # another seed, another table
    with pytest.raises(ValueError, match="rows"):
        init_proxy_rows(23, 3, 20, 24, 7)


def test_distribution_is_the_authors_kaiming_uniform():
    rows, dim = 5000, 64
    table = init_proxy_rows(rows, dim, 0, rows, 0).double()
    bound = 1 / math.sqrt(rows)  # kaiming_uniform(a=sqrt(5)) of a (dim, rows) matrix: fan_in = rows
    w = torch.nn.init.kaiming_uniform_(torch.empty(dim, rows, dtype=torch.float64), a=math.sqrt(5))
    assert w.abs().max() <= bound and table.abs().max() <= bound
    assert table.var().item() == pytest.approx(bound ** 2 / 3, rel=0.02)
    assert abs(table.mean().item()) < 0.01 * bound


def test_a_slice_of_ten_million_rows_draws_only_its_blocks():
    """The point of sharding: a rank's rows of a 10M-class table without the 5 GB table itself."""
    t0 = time.perf_counter()
    part = init_proxy_rows(10_000_000, 128, 5_000_000, 5_000_010, 3)
    assert time.perf_counter() - t0 < 5 and part.shape == (10, 128)
    block = 5_000_000 // 4096
    g = torch.Generator().manual_seed(seed_of(3, block))
    want = torch.rand(4096, 128, generator=g) * (2 / math.sqrt(10_000_000)) - 1 / math.sqrt(10_000_000)
    off = 5_000_000 - block * 4096
    assert torch.equal(part, want[off:off + 10])


def test_the_table_is_not_the_models_random_numbers():
    """torch.manual_seed(seed) initialises the model: the proxies of the same seed must not be its numbers."""
    torch.manual_seed(0)
    same_stream = torch.rand(4096, 8) * 2 / math.sqrt(4096) - 1 / math.sqrt(4096)
    assert not torch.allclose(init_proxy_rows(4096, 8, 0, 4096, 0), same_stream)


def test_every_mode_starts_from_one_table_in_one_process():
    C, N, dim = 2100, 2, 8  # 4,200 rows: more than one block
    want = ProxyGML(C, dim, N, seed=11).state_dict()["proxies"]
    assert torch.equal(want, init_proxy_rows(C * N, dim, 0, C * N, 11))
    for mode in ("local", "gather", "sharded"):
        crit = build_criterion(mode, C, dim, proxies_per_class=N, seed=11)
        assert torch.equal(crit.full_state_dict()["proxies"], want), mode
    torch.manual_seed(0)  # without a seed ProxyGML follows torch's global generator, as torch modules do
    a = ProxyGML(C, dim, N).proxies.detach().clone()
    torch.manual_seed(0)
    assert torch.equal(ProxyGML(C, dim, N).proxies, a) and not torch.equal(a, want)


def tables_on_ranks(rank, size):
    C, N, dim = 1500, 3, 4  # 4,500 rows: a block boundary falls inside a rank's block
    out = {}
    for mode in ("local", "gather", "sharded"):
        crit = build_criterion(mode, C, dim, proxies_per_class=N, seed=5)
        out[mode] = crit.full_state_dict()["proxies"]
        out[mode + "_own"] = crit.proxies.detach().clone()
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [2, pytest.param(3, marks=pytest.mark.slow)])  # 2 ranks by default
def test_every_mode_and_world_size_starts_from_one_table(size):
    want = init_proxy_rows(4500, 4, 0, 4500, 5)
    results = run_on_gloo_ranks(tables_on_ranks, size, timeout=240)
    rows = []
    for out in results:
        for mode in ("local", "gather", "sharded"):
            assert torch.equal(out[mode], want), mode
        assert torch.equal(out["gather_own"], want) and torch.equal(out["local_own"], want)
        rows.append(out["sharded_own"])
        assert out["sharded_own"].shape[0] < 4500  # a rank holds only its block
    assert torch.equal(torch.cat(rows), want)
