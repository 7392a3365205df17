import numpy as np
import pytest
import torch
from geoswc.retrieval.model import ResidualRetrievalModule, read_metadata
from geoswc.retrieval.sampler import OnePairPerCellSampler


def test_module_output_is_unit_norm_same_dim():
    torch.manual_seed(0)
    module = ResidualRetrievalModule(16, hidden_dim=32)
    out = module(torch.randn(5, 16) * 3 + 1)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def _layer_norm(x, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("residual_input", ["normalized", "raw"])
def test_module_matches_written_out_formula(residual_input):
    torch.manual_seed(1)
    module = ResidualRetrievalModule(8, hidden_dim=12, residual_input=residual_input)
    z = torch.randn(4, 8) * 5 + 2
    w1, b1 = module.fc1.weight.detach(), module.fc1.bias.detach()
    w2, b2 = module.fc2.weight.detach(), module.fc2.bias.detach()
    x = _layer_norm(z)  # LayerNorm starts with unit gain and zero bias
    ffn = torch.clamp(x @ w1.T + b1, min=0) @ w2.T + b2
    y = _layer_norm((x if residual_input == "normalized" else z) + ffn)
    expected = y / torch.sqrt((y**2).sum(dim=1, keepdim=True))
    torch.testing.assert_close(module(z), expected, rtol=1e-5, atol=1e-6)


def test_module_rejects_bad_input():
    with pytest.raises(ValueError, match="residual_input 'sum'"):
        ResidualRetrievalModule(4, residual_input="sum")
    with pytest.raises(ValueError, match="last dimension 4"):
        ResidualRetrievalModule(4, hidden_dim=8)(torch.zeros(2, 5))


def test_save_load_roundtrip_and_fingerprint(tmp_path):
    torch.manual_seed(2)
    module = ResidualRetrievalModule(6, hidden_dim=10)
    path = tmp_path / "rrm.safetensors"
    module.save(path, fingerprint="abc123")
    meta = read_metadata(path)
    assert (meta["dim"], meta["hidden_dim"], meta["fingerprint"]) == ("6", "10", "abc123")
    loaded = ResidualRetrievalModule.load(path, fingerprint="abc123")
    z = torch.randn(3, 6)
    torch.testing.assert_close(loaded(z), module(z))
    with pytest.raises(ValueError, match="partition 'abc123'.*'zzz'"):
        ResidualRetrievalModule.load(path, fingerprint="zzz")
    with pytest.raises(FileNotFoundError):
        ResidualRetrievalModule.load(tmp_path / "missing.safetensors")


def test_embed_numpy_in_batches_matches_forward():
    torch.manual_seed(3)
    module = ResidualRetrievalModule(8, hidden_dim=16)
    feats = np.random.default_rng(0).normal(size=(37, 8)).astype(np.float16)
    out = module.embed(feats, batch_size=10)
    assert out.dtype == np.float32 and out.shape == (37, 8)
    with torch.no_grad():
        ref = module(torch.from_numpy(feats.astype(np.float32))).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# --- sampler -------------------------------------------------------------------------------------------


def _labels():
    # cell 0: 5 photos, cell 1: 1 photo (never drawn), cell 2: 2 photos, cell 4: 3 photos, -1: unlabelled
    return np.array([0, 2, 0, 1, 4, 0, 4, -1, 2, 0, 4, 0, -1])


def test_sampler_one_pair_per_cell_distinct_same_cell():
    labels = _labels()
    sampler = OnePairPerCellSampler(labels, seed=7)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        pairs = np.array(list(sampler))
        assert len(pairs) == 3
        assert sorted(labels[pairs[:, 0]]) == [0, 2, 4]
        assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all()
        assert (pairs[:, 0] != pairs[:, 1]).all()


def test_sampler_deterministic_per_seed_and_epoch_and_covers_cells():
    labels = _labels()
    a, b = OnePairPerCellSampler(labels, seed=1), OnePairPerCellSampler(labels, seed=1)
    np.testing.assert_array_equal(a.epoch_pairs(3), b.epoch_pairs(3))
    epochs = [a.epoch_pairs(e) for e in range(50)]
    assert any(not np.array_equal(epochs[0], e) for e in epochs[1:])
    # Over many epochs every photo of cell 0 is drawn as query and as positive.
    drawn = np.concatenate(epochs)
    assert set(drawn[labels[drawn[:, 0]] == 0].ravel()) == set(np.flatnonzero(labels == 0))


def test_sampler_shards_pad_to_equal_length():
    labels = np.repeat(np.arange(7), 3)  # 7 cells -> 7 pairs over 3 ranks: 3 each, 2 padded
    shards = [OnePairPerCellSampler(labels, seed=0, num_replicas=3, rank=r).shard(5) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    union = np.concatenate(shards)
    full = OnePairPerCellSampler(labels, seed=0).epoch_pairs(5)
    assert {tuple(p) for p in union} == {tuple(p) for p in full}
    one_cell = OnePairPerCellSampler(np.array([3, 3]), num_replicas=4, rank=3)
    assert len(one_cell.shard(0)) == 1


def test_sampler_errors():
    with pytest.raises(ValueError, match="two or more photos"):
        OnePairPerCellSampler(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="rank must be in"):
        OnePairPerCellSampler(np.array([0, 0]), num_replicas=2, rank=2)
