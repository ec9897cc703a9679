import pytest

from pipelines.config import ConfigError, load_config


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_demo_config_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "deploy" / "configs" / "demo.toml")
    assert cfg.benchmark.enabled and cfg.extract.engine == "ray" and cfg.graph.k == 30 and cfg.extract.whitening == "pca"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bacth_size'\] in \[extract\]"):
        load_config(_write(tmp_path, "[extract]\nbacth_size = 3\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"extract.batch_size must be int, got str"):
        load_config(_write(tmp_path, '[extract]\nbatch_size = "16"\n'))
    with pytest.raises(ConfigError, match=r"graph.reciprocal must be bool"):
        load_config(_write(tmp_path, "[graph]\nreciprocal = 1\n"))
    with pytest.raises(ConfigError, match=r"query.methods must be a list"):
        load_config(_write(tmp_path, '[query]\nmethods = "knn"\n'))


def test_int_is_accepted_for_float_and_bad_toml_is_reported(tmp_path):
    assert load_config(_write(tmp_path, "[query]\nalpha = 1\n")).query.alpha == 1.0
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[query\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")
