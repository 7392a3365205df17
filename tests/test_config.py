import pytest

from geoswc.config import Config, available_presets, load_preset, resolve_config


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.backbone.model == "efficientnet_b4"
    assert (cfg.backbone.lr, cfg.backbone.momentum, cfg.backbone.weight_decay) == (0.01, 0.9, 1e-4)
    assert (cfg.backbone.epochs, cfg.backbone.batch_size, cfg.backbone.lr_gamma) == (25, 64, 0.5)
    assert (cfg.retrieval.temperature, cfg.retrieval.memory_size, cfg.retrieval.hidden_dim) == (
        0.05,
        4096,
        4096,
    )
    assert (cfg.swc.k, cfg.swc.eps_km, cfg.swc.min_samples) == (10, 1.0, 1)
    assert cfg.data.image_size == 300


def test_precedence_preset_file_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone:\n  lr: 0.5\n  epochs: 3\n")
    cfg = resolve_config("tiny", path, ["backbone.epochs=7", "swc.k=5"])
    assert cfg.backbone.lr == 0.5  # file over preset
    assert cfg.backbone.epochs == 7  # flag over file
    assert cfg.swc.k == 5
    assert cfg.backbone.model == load_preset("tiny").backbone.model  # preset over default


def test_roundtrip(tmp_path):
    cfg = load_preset("tiny")
    cfg.save(tmp_path / "config.yaml")
    assert Config.load(tmp_path / "config.yaml") == cfg
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="choose one of: .*paper.*tiny"):
        load_preset("huge")
    with pytest.raises(ValueError, match="unknown setting backbone.lrr"):
        Config().override(["backbone.lrr=1"])
    with pytest.raises(ValueError, match="unknown config section 'bakcbone'"):
        Config().merge({"bakcbone": {}})
    assert set(available_presets()) >= {"paper", "tiny"}
