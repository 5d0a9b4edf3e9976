"""Benchmark code: the floors' probes (bench/probes.cpp, built by bench/probes.py for the CPU level
this process loaded) read what they are given and do the multiply-adds they count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import probes  # noqa: E402  (bench/probes.py)


@pytest.fixture(scope="module", autouse=True)
def _built():
    probes.load()  # (a compile of about half a minute the first time, cached by torch after)


def test_bench_probes_read_every_byte_and_count_their_multiply_adds():
    """The benchmark's floors (torch.ops.fusedjd_bench): `read` sums the 64-bit words of every
    tensor it is given (so it read them all), `multiply_adds` returns the multiply-adds its
    register blocks did: threads x reps x 16 pairs x 2048 columns, for rows of every dtype."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 4096, generator=gen), torch.randn(3, 64, generator=gen).double()]
    words = sum(int(w) % 2**64 for x in xs for w in x.view(torch.int64).flatten().tolist())
    assert torch.ops.fusedjd_bench.read(xs) == float(words % 2**52)
    assert torch.ops.fusedjd_bench.read([torch.empty(0)]) == 0.0
    with pytest.raises(RuntimeError, match=r"`x\[0\]` must be a contiguous CPU tensor"):
        torch.ops.fusedjd_bench.read([xs[0].T])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert torch.ops.fusedjd_bench.multiply_adds(3, dtype) == torch.get_num_threads() * 3 * 16 * 2048
        # the count's 16 x 2048: one block sum of the probe is the 16 dot products of its rows
        # (x = r0, r1, r0, r1) over all 2048 columns, checked here against float64 sums
        rows, sums = torch.ops.fusedjd_bench.block_sums(dtype)
        assert rows.shape == (2, 2048) and (rows > 0).all() and not torch.equal(rows[0], rows[1])
        x = rows[[0, 1, 0, 1]]
        # (float32 lane sums: 4 to 16 lanes by level, up to about 1.4e-6 apart from float64)
        torch.testing.assert_close(sums, x @ x.T, rtol=2e-5, atol=0)
        assert not torch.allclose(sums, x[:, :2047] @ x[:, :2047].T, rtol=2e-5, atol=0)  # a column short (5e-4) shows
