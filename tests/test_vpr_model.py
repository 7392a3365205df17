"""Place-recognition models from model folders (geoswc.street.model)."""

from __future__ import annotations

import pytest
import torch
from vpr_fixtures import tiny_backbone

from geoswc.classifiers.aggregation import GeM, NetVLAD
from geoswc.classifiers.backbone import save_backbone
from geoswc.street.model import LoadedVPR, VPRSpec, from_folder, save_vpr_parts
from geoswc.classifiers.aggregation import VPRNet


def test_a_model_folder_is_pooled_as_its_config_says(tmp_path):
    backbone = tiny_backbone()
    save_backbone(
        backbone,
        tmp_path,
        name="tf_efficientnet_lite0",
        fingerprint="f",
        config={"backbone": {"pool": "gem"}},
    )
    loaded = from_folder(tmp_path)
    assert loaded.spec.pool == "gem" and isinstance(loaded.net.aggregation, GeM)
    assert from_folder(tmp_path, pool="avg").spec.pool == "avg"
    with pytest.raises(ValueError, match="choose one of: avg, gem, netvlad"):
        from_folder(tmp_path, pool="max")


def test_trained_aggregation_round_trips(tmp_path):
    net = VPRNet(tiny_backbone(), "netvlad", clusters=4)
    with torch.no_grad():
        net.aggregation.centroids.normal_()
    save_backbone(net.backbone, tmp_path, name="tf_efficientnet_lite0", fingerprint="f")
    spec = VPRSpec(backbone="tf_efficientnet_lite0", pool="netvlad", clusters=4, trained_aggregation=True)
    save_vpr_parts(tmp_path, LoadedVPR(net, {}, spec))
    back = from_folder(tmp_path)
    assert isinstance(back.net.aggregation, NetVLAD) and back.spec.trained_aggregation
    assert torch.equal(back.net.aggregation.centroids, net.aggregation.centroids)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(back.net.eval()(x), net.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="trained 'netvlad' aggregation"):
        from_folder(tmp_path, pool="gem")
