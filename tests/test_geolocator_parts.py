"""`Geolocator.from_parts`: the one way parts become a Geolocator (a model folder, ``geoswc assemble``, an
import), checking that they fit together before composing them."""

import copy

import numpy as np
import pytest
import torch

from geoswc.classifiers import create_head
from geoswc.geolocator import Geolocator
from geoswc.retrieval.model import ResidualRetrievalModule


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Geolocator.from_pretrained(tiny_model_dir, device="cpu", precision_mode="fp32", runtime="torch")


def _parts(model, **changes):
    parts = dict(
        backbone=model.backbone,
        geocells=model.geocells,
        heads=dict(model.heads),
        retrieval=model.retrieval,
        index=model.index,
        config=model.config,
        backbone_name=model.backbone_name,
        data_config=model.data_config,
    )
    parts.update(changes)
    return parts


def test_from_parts_composes_the_same_model(model):
    again = Geolocator.from_parts(**_parts(model))
    features = torch.randn(4, model.backbone.num_features, generator=torch.Generator().manual_seed(0))
    for mode in ("cell", "swc", "rrm"):
        a, b = model.locate(features, mode=mode), again.locate(features, mode=mode)
        np.testing.assert_array_equal(a.latlon_deg, b.latlon_deg)
        np.testing.assert_array_equal(a.top_cells, b.top_cells)
    assert again.head_names == model.head_names and again.backbone_name == model.backbone_name


def test_a_head_of_another_width_is_refused_naming_its_source(model):
    width = model.backbone.num_features
    narrow = create_head("ce", in_features=width + 3, geocells=model.geocells)
    with pytest.raises(
        ValueError, match=f"the head takes {width + 3} features, but the backbone .* gives {width}"
    ):
        Geolocator.from_parts(**_parts(model, heads={"ce": narrow}))
    with pytest.raises(ValueError, match=r"^heads/ce.safetensors: the head takes .*\(bb.safetensors\)"):
        Geolocator.from_parts(
            **_parts(model, heads={"ce": narrow}),
            sources={"backbone": "bb.safetensors", "heads": {"ce": "heads/ce.safetensors"}},
        )


def test_retrieval_and_index_widths_are_checked(model):
    width = model.backbone.num_features
    wider = ResidualRetrievalModule(width + 2, hidden_dim=8)
    with pytest.raises(ValueError, match=f"retrieval.safetensors: .* dim {width + 2}, but the backbone"):
        Geolocator.from_parts(
            **_parts(model, retrieval=wider), sources={"retrieval": "retrieval.safetensors"}
        )
    # The same index with one more column: embeddings wider than the retrieval module's.
    index = copy.copy(model.index)
    index.embeddings = np.pad(np.asarray(model.index.embeddings), ((0, 0), (0, 1)))
    with pytest.raises(
        ValueError, match=f"idx/embeddings.npy: embeddings of dim {width + 1}, but the retrieval"
    ):
        Geolocator.from_parts(**_parts(model, index=index), sources={"index": "idx"})


def test_the_constructors_partition_checks_still_run(model):
    other = create_head("ce", in_features=model.backbone.num_features, geocells=model.geocells)
    other.fingerprint = "0123456789abcdef"
    with pytest.raises(ValueError, match="0123456789abcdef.*" + model.fingerprint):
        Geolocator.from_parts(**_parts(model, heads={"ce": other}))
