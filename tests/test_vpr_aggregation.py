"""GeM, NetVLAD and PCA (geoswc.classifiers.aggregation).

The oracle tests run the benchmark's own layers (Berton et al., CVPR 2022, ``model/aggregation.py``, from
../shared) with the installed torch/faiss on feature maps of the tiny preset's real ImageNet backbone over
street-world photos, and require the same outputs within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from vpr_fixtures import benchmark_root, load_benchmark_module, make_tiny_world, tiny_backbone

from geoswc.classifiers.aggregation import (
    GeM,
    NetVLAD,
    VPRNet,
    DescriptorPCA,
    create_aggregation,
    kmeans_centroids,
    sample_local_descriptors,
)
from geoswc.data.images import decode_array
from geoswc.data.transforms import ToNormalizedTensor


@pytest.fixture(scope="module")
def feature_maps(tmp_path_factory):
    """(16, 1280, H, W) maps of real photos through a real-weights backbone."""
    world = make_tiny_world(tmp_path_factory.mktemp("streets") / "w")
    paths = sorted((world / "images" / "train" / "database").glob("*.jpg"))[:16]
    norm = ToNormalizedTensor((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # Upsampled to 192 x 256: a 6 x 8 map of local descriptors per photo.
    big = [np.asarray(Image.fromarray(decode_array(p)).resize((256, 192), Image.BILINEAR)) for p in paths]
    pixels = torch.stack([norm(b) for b in big])
    with torch.no_grad():
        return tiny_backbone().forward_features(pixels)


def test_gem_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    assert GeM(3.0, normalize_input=False)(x).item() == pytest.approx(expected, rel=1e-6)
    assert GeM(1.0, normalize_input=False)(x).item() == pytest.approx(2.5, rel=1e-6)
    assert create_aggregation("avg", dim=1)(x).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="choose one of: avg, gem, netvlad"):
        create_aggregation("vlad", dim=1)


def test_netvlad_by_hand():
    """One cluster, hard assignment: the normalised sum of residuals to the centroid."""
    layer = NetVLAD(1, 2, normalize_input=False)
    with torch.no_grad():
        layer.centroids.copy_(torch.tensor([[1.0, 0.0]]))
    x = torch.tensor([[3.0, 1.0], [0.0, 2.0]]).reshape(1, 2, 1, 2)  # local descriptors (3, 0), (1, 2)
    residual = torch.tensor([(3 - 1) + (1 - 1), 0 + 2], dtype=torch.float32)
    assert torch.allclose(layer(x)[0], residual / residual.norm())
    assert layer(x).shape == (1, 2)


@pytest.mark.shared
def test_gem_matches_benchmark(feature_maps, shared_reference):
    root = benchmark_root(shared_reference)
    agg = load_benchmark_module(root, "model/aggregation.py", "vpr_bench_aggregation")
    norm = load_benchmark_module(root, "model/normalization.py", "vpr_bench_normalization")
    for p in (3.0, 2.2):
        theirs = torch.nn.Sequential(norm.L2Norm(), agg.GeM(p=p), agg.Flatten())  # their --l2 before_pool
        ours = GeM(p)
        with torch.no_grad():
            assert torch.allclose(ours(feature_maps), theirs(feature_maps), atol=1e-5, rtol=0)
            plain = agg.GeM(p=p)(feature_maps)[:, :, 0, 0]
            assert torch.allclose(GeM(p, normalize_input=False)(feature_maps), plain, atol=1e-5, rtol=0)


@pytest.mark.shared
def test_netvlad_matches_benchmark(feature_maps, shared_reference):
    root = benchmark_root(shared_reference)
    agg = load_benchmark_module(root, "model/aggregation.py", "vpr_bench_aggregation")
    dim, clusters = feature_maps.shape[1], 16
    rng = np.random.default_rng(0)
    local = sample_local_descriptors(feature_maps, 8, rng)
    assert local.shape == (16 * 8, dim) and np.allclose(np.linalg.norm(local, axis=1), 1, atol=1e-5)
    centroids = kmeans_centroids(local, clusters, niter=20)

    theirs = agg.NetVLAD(clusters_num=clusters, dim=dim)
    theirs.init_params(centroids.copy(), local.copy())
    ours = NetVLAD(clusters, dim).init_from_descriptors(centroids, local)
    assert torch.allclose(ours.assign.weight, theirs.conv.weight.float(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        a, b = ours(feature_maps), theirs(feature_maps)
    assert a.shape == (16, clusters * dim)
    assert (a - b).abs().max().item() <= 1e-5

    # Any weights (as after training): load theirs, perturbed, into ours.
    with torch.no_grad():
        theirs.conv.weight.add_(0.05 * torch.randn_like(theirs.conv.weight))
        theirs.centroids.add_(0.05 * torch.randn_like(theirs.centroids))
        ours.assign.weight.copy_(theirs.conv.weight)
        ours.centroids.copy_(theirs.centroids)
        assert (ours(feature_maps) - theirs(feature_maps)).abs().max().item() <= 1e-5


def test_vprnet_descriptors_are_unit_and_trainable(feature_maps):
    net = VPRNet(tiny_backbone(), "gem")
    images = torch.randn(2, 3, 48, 64)
    out = net(images)
    assert out.shape == (2, net.out_dim) == (2, 1280)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    out.sum().backward()
    assert net.aggregation.p.grad is not None  # p is learnable
    vlad = VPRNet(tiny_backbone(), "netvlad", clusters=4)
    assert vlad(images).shape == (2, 4 * 1280)


def test_pca_whitening(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([5, 3, 1, 0.5, 0.1, 0.01]) + 2.0
    pca = DescriptorPCA(3, whiten=True).fit(x)
    raw = (x - x.mean(0)) @ pca.components_.T
    assert np.allclose(raw.var(axis=0, ddof=1), pca.explained_variance_, rtol=1e-6)
    assert pca.explained_variance_[0] > pca.explained_variance_[1] > pca.explained_variance_[2]
    # The first component follows the largest-variance axis.
    assert abs(pca.components_[0, 0]) > 0.99
    out = pca.transform(x)
    assert out.shape == (200, 3) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    back = DescriptorPCA.load(pca.save(tmp_path / "pca.safetensors"))
    assert np.allclose(back.transform(x), out, atol=1e-6)
    with pytest.raises(ValueError, match="lower --pca-dim"):
        DescriptorPCA(10).fit(x)
    assert F.normalize(torch.ones(1, 2)).shape == (1, 2)


def test_command_choices_are_the_layers():
    from geoswc.classifiers import aggregation
    from geoswc.commands import vpr

    assert vpr.POOLS == aggregation.POOLS and vpr.DEFAULT_CLUSTERS == aggregation.DEFAULT_CLUSTERS
