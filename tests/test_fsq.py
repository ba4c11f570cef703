"""FSQ (Mentzer et al. 2023): indices and grid codes round-trip exactly, the forward lies on the grid and
reports its indices, and the levels must give codebook_size codes."""
import math

import pytest
import torch

import vqvae
from vqvae import FSQQuantizer
from conftest import latents


@pytest.mark.parametrize("levels", [[8, 8, 8], [8, 5, 5, 5], [3, 4], [2]])
def test_fsq_indices_and_codes_round_trip_exactly(levels):
    K = math.prod(levels)
    q = FSQQuantizer(K, 8, fsq_levels=levels)
    idx = torch.arange(K)
    codes = q.indices_to_codes(idx)                                   # (K, d)
    assert codes.shape == (K, len(levels))
    assert torch.equal(q.codes_to_indices(codes), idx)
    assert torch.equal(q.indices_to_codes(q.codes_to_indices(codes)), codes)
    assert len({tuple(c) for c in codes.tolist()}) == K               # K distinct grid points
    for i, L in enumerate(levels):                                    # each channel takes exactly L values
        assert codes[:, i].unique().numel() == L


def test_fsq_forward_is_on_the_grid_and_reports_its_indices():
    torch.manual_seed(0)
    q = FSQQuantizer(40, 8, fsq_levels=[2, 4, 5])
    z = latents(scale=3.0).requires_grad_(True)
    z_q, losses, info = q(z)
    assert losses == {}
    assert info["code_indices"].max() < 40 and info["code_counts"].sum() == 2 * 4 * 4
    # the decoder input is proj_out of exactly the grid codes of the reported indices
    codes = q.indices_to_codes(info["code_indices"].flatten())
    expected = q.proj_out(codes).reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, expected)
    # the bound keeps every channel strictly inside its L levels
    h = q.bound(q.proj_in(z.detach().permute(0, 2, 3, 1).reshape(-1, 8)) * 100)
    assert (h.round() >= -(q.levels // 2)).all() and (h.round() <= (q.levels - 1) // 2).all()
    z_q.sum().backward()
    assert z.grad.abs().sum() > 0                                     # STE through the rounding


def test_fsq_config_must_match_codebook_size():
    with pytest.raises(vqvae.BavqError, match="give 512 codes but codebook_size is 256"):
        vqvae.make_config({"quantizer": "fsq", "codebook_size": 256, "fsq_levels": [8, 8, 8]}).validate()
    with pytest.raises(vqvae.BavqError, match="not to fsq"):
        vqvae.make_config({"quantizer": "fsq", "init": "kmeans"}).validate()
    vqvae.make_config({"quantizer": "fsq", "codebook_size": 1000, "fsq_levels": [8, 5, 5, 5]}).validate()
