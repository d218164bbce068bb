import pytest
import torch

from robuq.deploy.pack import pack_ternary, pack_weight, packed_cols, unpack_ternary, unpack_weight
from robuq.quant.ternary import TernaryWeight, ternary_codes


@pytest.mark.parametrize("n,k", [(1, 1), (3, 4), (5, 7), (17, 130), (64, 1152), (2, 4609)])
def test_round_trip_exact(n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    codes = torch.randint(-1, 2, (n, k), generator=g)
    p = pack_ternary(codes)
    assert p.dtype == torch.uint8 and p.shape == (n, packed_cols(k)) == (n, (k + 3) // 4)
    assert torch.equal(unpack_ternary(p, k), codes.to(torch.int8))
    assert torch.equal(unpack_ternary(p, k, torch.float32), codes.float())


def test_float_codes_and_layout():
    codes = torch.tensor([[-1.0, 0.0, 1.0, 1.0, -1.0]])  # K=5 -> Kq=2, quarters at 0,2,4,6
    p = pack_ternary(codes)
    # byte 0 holds columns 0, 2, 4, (6: padding) -> stored +1: 0, 2, 0, 1
    assert p[0, 0].item() == 0 | (2 << 2) | (0 << 4) | (1 << 6)
    # byte 1 holds columns 1, 3, (5, 7: padding) -> 1, 2, 1, 1
    assert p[0, 1].item() == 1 | (2 << 2) | (1 << 4) | (1 << 6)


def test_rejects_non_ternary():
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_ternary(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="integers"):
        pack_ternary(torch.tensor([[0.5, 0.0]]))
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="0b11"):
        unpack_ternary(torch.full((1, 1), 0xFF, dtype=torch.uint8), 4)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_pack_weight_matches_ternary_weight(granularity):
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(0))
    p, s = pack_weight(w, granularity)
    assert s.shape == (33,) and s.dtype == torch.float32
    dense = unpack_weight(p, s, 70)
    fake = TernaryWeight(granularity)(w)
    torch.testing.assert_close(dense, fake, rtol=0, atol=1e-6)
    codes, _ = ternary_codes(w, granularity)
    assert torch.equal(unpack_ternary(p, 70, torch.float32), codes)
