"""Train stage: unsupervised fine-tuning on a run's image shards with tuples mined each epoch.

Every epoch: embed the pool with the current network (pool rows sharded over workers, gathered),
mine tuples (retrieval.mining: manifold or random) with an epoch-seeded generator, then train on
them, each step's tuples split over the workers (DDP averages the gradients). After each epoch the
rank-0 worker writes `<out>/checkpoints/epoch-XXXX.pt` atomically (model, optimiser, epoch, step,
mining state, config) and appends a line to `<out>/metrics.jsonl`; a rerun resumes from the
latest checkpoint. The epoch seeding makes a resumed run reach the weights of an uninterrupted one.
Engines: "local" (this process) and "ray" (`ray_worker` run by cluster.ray_train's TorchTrainer, one
DDP worker each).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from retrieval.finetune_net import RetrievalNet, freeze_prefix, init_whitening
from retrieval.losses import tuple_loss
from retrieval.mining import Tuples, mine_tuples

from .checkpoints import CheckpointError, checkpoint_path, list_checkpoints, net_from_checkpoint, read_checkpoint, save_checkpoint
from .config import TrainConfig, absolute_paths, config_to_dict
from .shards import list_shards, read_table, write_bytes, write_json

log = logging.getLogger(__name__)
CRASH_ENV = "RETRIEVAL_TRAIN_CRASH_AFTER_STEPS"  # test hook: raise InjectedCrash after this many steps


class InjectedCrash(RuntimeError):
    """Raised by the crash hook (env RETRIEVAL_TRAIN_CRASH_AFTER_STEPS) to test resuming."""


@dataclass
class Runtime:
    """Where a training loop runs: rank/world of the process group, device, how to wrap the model
    for DDP, and how to report per-epoch metrics (Ray Train's report, or nothing)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    report: Callable[[dict], None] = lambda metrics: None


def train_dir(run_dir: Path, cfg: TrainConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(run_dir) / "train"


def load_pool(images_dir: Path, *, max_side: int, mean: Sequence[float], std: Sequence[float],
              boxes: bool = False) -> tuple[np.ndarray, list[str], list[torch.Tensor]]:
    """Image shards -> ids (n,) int64, keys, and per image a (3, H, W) float32 normalised tensor
    (aspect kept, longer side max_side). Undecodable images are skipped with a warning."""
    from .decode import open_rgb, to_input

    shards = list_shards(images_dir)
    if not shards:
        raise FileNotFoundError(f"train: no image shards in {images_dir}; run `retrieval ingest` first")
    ids, keys, ims = [], [], []
    for p in shards:
        t = read_table(p)
        bbs = t.column("bbox").to_pylist() if boxes and "bbox" in t.column_names else [None] * len(t)
        for i, k, b, bb in zip(t.column("id").to_pylist(), t.column("key").to_pylist(), t.column("image").to_pylist(), bbs):
            try:
                ims.append(torch.from_numpy(to_input(open_rgb(b, bb), max_side=max_side, mean=mean, std=std)))
            except (ValueError, OSError) as e:
                log.warning("train: skipping %s: cannot decode (%s)", k, e)
                continue
            ids.append(i)
            keys.append(k)
    return np.asarray(ids, np.int64), keys, ims


def embed(net: torch.nn.Module, images: Sequence[torch.Tensor], *, batch: int = 32, device: torch.device | None = None,
          head: bool = True) -> torch.Tensor:
    """(n, D) float32 descriptors of images ((3, H, W) tensors, any sizes), `batch` images per
    forward call. Gradients flow when called with grad enabled. head=False stops after GeM + L2
    (before the whitening layer)."""
    device = device or torch.device("cpu")
    module = getattr(net, "module", net)
    if not len(images):
        return torch.zeros(0, module.out_dim if head else module.out_channels)
    outs = []
    for s in range(0, len(images), max(1, batch)):
        xs = [im.to(device) for im in images[s : s + batch]]
        outs.append(net(xs) if head else module.pooled(xs))
    return torch.cat(outs)


def embed_pool(net: RetrievalNet, images: Sequence[torch.Tensor], rt: Runtime, *, batch: int, head: bool = True) -> np.ndarray:
    """Descriptors of the whole pool, rows rank::world computed by each worker and all-gathered.

    Returns (n, D) float32, identical on every worker."""
    n = len(images)
    mine = list(range(rt.rank, n, rt.world))
    with torch.no_grad():
        local = embed(net, [images[i] for i in mine], batch=batch, device=rt.device, head=head)
    if rt.world == 1:
        return local.cpu().numpy().astype(np.float32)
    rows = -(-n // rt.world)
    pad = torch.zeros(rows, local.shape[1], dtype=local.dtype, device=local.device)
    pad[: local.shape[0]] = local
    parts = [torch.zeros_like(pad) for _ in range(rt.world)]
    dist.all_gather(parts, pad)
    X = np.zeros((n, local.shape[1]), np.float32)
    for r, part in enumerate(parts):
        sel = list(range(r, n, rt.world))
        X[sel] = part[: len(sel)].cpu().numpy()
    return X


def tuple_batch_loss(net: torch.nn.Module, images: Sequence[torch.Tensor], tuples: np.ndarray, cfg: TrainConfig,
                     *, device: torch.device | None = None) -> torch.Tensor:
    """Mean loss of (T, 2 + K) tuples (anchor, positive, negatives as pool indices); each distinct
    image is embedded once. Returns a scalar with grad."""
    tuples = np.asarray(tuples, dtype=np.int64)
    uniq, inv = np.unique(tuples, return_inverse=True)
    V = embed(net, [images[i] for i in uniq], batch=len(uniq), device=device)  # one forward: one DDP all-reduce
    V = V[torch.as_tensor(inv.reshape(tuples.shape), device=V.device)]  # (T, 2 + K, D)
    return tuple_loss(cfg.loss, V[:, 0], V[:, 1], V[:, 2:], margin=cfg.margin)


def mine(X: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> Tuples:
    return mine_tuples(cfg.miner, X, n_tuples=cfg.tuples_per_epoch, n_neg=cfg.n_neg, rng=rng, k=cfg.mine_k,
                       gamma=cfg.mine_gamma, alpha=cfg.mine_alpha, euclid_k=cfg.euclid_k, pos_k=cfg.pos_k,
                       neg_pool=cfg.neg_pool, neg_exclude_k=cfg.neg_exclude_k)


def build_net(cfg: TrainConfig) -> RetrievalNet:
    """Pretrained backbone + GeM head (or the network of a fine-tuned checkpoint given as weights)."""
    from .models import load_backbone

    model, _ = load_backbone(cfg.backbone, cfg.weights)
    if isinstance(model, RetrievalNet):
        if model.arch["whiten_dim"] != cfg.whiten_dim:
            raise CheckpointError(f"train: weights {cfg.weights} have whiten_dim {model.arch['whiten_dim']}, config {cfg.whiten_dim}")
        return model
    return RetrievalNet(model, backbone_name=cfg.backbone, p=cfg.gem_p, learn_p=cfg.learn_p, whiten_dim=cfg.whiten_dim)


def make_optimizer(net: RetrievalNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    head = [p for p in net.retrieval_head.parameters() if p.requires_grad]
    body = [p for p in net.backbone.parameters() if p.requires_grad]
    return torch.optim.Adam([{"params": body, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
                             {"params": head, "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": 0.0,
                              "base_lr": cfg.lr * cfg.head_lr_mult}])


class Validation:
    """kNN mAP of the current network on a labelled validation run (database + query crops)."""

    def __init__(self, cfg: TrainConfig, net: RetrievalNet):
        from .groundtruth import read_ground_truth

        run = Path(cfg.val_run)
        self.db_ids, db_keys, self.db = load_pool(run / "images", max_side=cfg.max_side, mean=net.input_mean, std=net.input_std)
        _, self.q_keys, self.q = load_pool(run / "queries" / "images", max_side=cfg.max_side, mean=net.input_mean,
                                           std=net.input_std, boxes=True)
        self.keys_by_id = [""] * (int(self.db_ids.max()) + 1)
        for i, k in zip(self.db_ids.tolist(), db_keys):
            self.keys_by_id[i] = k
        self.gt = read_ground_truth(cfg.val_gnd)
        self.batch = cfg.embed_batch

    def __call__(self, net: RetrievalNet, rt: Runtime) -> dict:
        """{"val_<protocol>": mAP %} (E/M/H for the Revisited protocol)."""
        from retrieval.knn import knn_search

        from .evaluate import evaluate_ranks

        net.eval()
        X = embed_pool(net, self.db, rt, batch=self.batch)
        Q = embed_pool(net, self.q, rt, batch=self.batch)
        _, I = knn_search(Q, X, X.shape[0])
        res = evaluate_ranks(self.db_ids[I], self.q_keys, self.keys_by_id, self.gt)
        return {f"val_{p}": round(v["map"], 2) for p, v in res.items()}


def check_config(cfg: TrainConfig, world: int) -> None:
    """Checks across fields and the worker count (the choices of loss, miner, ... are checked when the
    configuration loads)."""
    if cfg.batch_tuples <= 0 or cfg.batch_tuples % world:
        raise ValueError(f"train: batch_tuples ({cfg.batch_tuples}) must be a positive multiple of the {world} workers")
    if cfg.epochs <= 0 or cfg.tuples_per_epoch <= 0 or cfg.n_neg <= 0:
        raise ValueError("train: epochs, tuples_per_epoch and n_neg must be positive")
    if bool(cfg.val_run) != bool(cfg.val_gnd):
        raise ValueError("train: validation needs both val_run and val_gnd")


def train_loop(run_dir: Path, cfg: TrainConfig, rt: Runtime | None = None) -> dict:
    """The training loop run by every worker (or once, in-process). Returns the last epoch's metrics."""
    rt = rt or Runtime()
    check_config(cfg, rt.world)
    out = train_dir(run_dir, cfg)
    ckpt_dir = out / "checkpoints"
    images_dir = (Path(cfg.images) if cfg.images else Path(run_dir)) / "images"
    net = build_net(cfg)
    frozen = freeze_prefix(net, cfg.freeze_blocks)
    ids, keys, images = load_pool(images_dir, max_side=cfg.max_side, mean=net.input_mean, std=net.input_std)
    log.info("train: pool of %d images from %s (rank %d/%d, %d params frozen)", len(images), images_dir, rt.rank, rt.world, frozen)
    start_epoch, step = 0, 0
    found = list_checkpoints(ckpt_dir)
    opt_state = None
    if found:
        ep, path = found[-1]
        state = read_checkpoint(path)
        resumed = net_from_checkpoint(state, backbone=cfg.backbone, path=path, whiten_dim=cfg.whiten_dim)
        net.load_state_dict(resumed.state_dict())
        opt_state, start_epoch, step = state["optimizer"], int(state["epoch"]), int(state["step"])
        log.info("train: resuming from %s (epoch %d done, step %d)", path, start_epoch, step)
    elif cfg.whiten_dim > 0:
        _init_whitening(net, images, rt, cfg)
    net.to(rt.device)
    opt = make_optimizer(net, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    model = rt.wrap_model(net)
    if rt.rank == 0:
        _truncate_log(out / "metrics.jsonl", start_epoch)
        write_json(config_to_dict(cfg), out / "config.resolved.json")
    validate = Validation(cfg, net) if cfg.val_run else None
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    steps_here, last = 0, {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])  # the mining state: epoch-seeded, so a resumed epoch repeats exactly
        rng_state = json.dumps(rng.bit_generator.state)
        net.eval()
        X = embed_pool(net, images, rt, batch=cfg.embed_batch)
        tuples = mine(X, cfg, rng).as_array()
        t_mine = time.perf_counter() - t0
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * cfg.lr_decay ** epoch
        model.train()
        losses, t1 = [], time.perf_counter()
        n_steps = len(tuples) // cfg.batch_tuples
        for s in range(n_steps):
            batch = tuples[s * cfg.batch_tuples : (s + 1) * cfg.batch_tuples][rt.rank :: rt.world]
            loss = tuple_batch_loss(model, images, batch, cfg, device=rt.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            steps_here += 1
            if crash_after and steps_here >= crash_after:
                raise InjectedCrash(f"train: injected crash after {steps_here} steps (epoch {epoch}, step {s})")
        t_train = time.perf_counter() - t1
        done = n_steps * cfg.batch_tuples
        loss_mean = float(np.mean(losses)) if losses else float("nan")
        if rt.world > 1:  # the logged loss is the mean over all workers' tuples
            lt = torch.tensor([loss_mean], dtype=torch.float64)
            dist.all_reduce(lt)
            loss_mean = float(lt[0]) / rt.world
        last = {"epoch": epoch + 1, "step": step, "loss": loss_mean,
                "tuples": done, "mined": int(len(tuples)), "mining_seconds": round(t_mine, 3), "train_seconds": round(t_train, 3),
                "tuples_per_s": round(done / t_train, 3) if t_train > 0 else 0.0, "gem_p": float(torch.as_tensor(net.retrieval_head.pool.p).detach()),
                "lr": opt.param_groups[0]["lr"], "workers": rt.world}
        if validate is not None:
            last.update(validate(net, rt))
        if rt.rank == 0:
            mining = {"miner": cfg.miner, "seed": cfg.seed, "epoch": epoch, "rng_state": rng_state,
                      "tuples": tuples.tolist()}
            save_checkpoint(checkpoint_path(ckpt_dir, epoch + 1), net=net, optimizer=opt, epoch=epoch + 1, step=step,
                            mining=mining, config=config_to_dict(cfg))
            _append_log(out / "metrics.jsonl", last)
            log.info("train: epoch %d/%d loss %.4f, %d tuples, %.2f tuples/s (mining %.1f s)", epoch + 1, cfg.epochs,
                     last["loss"], done, last["tuples_per_s"], t_mine)
        rt.report(last)
    if rt.rank == 0:
        final = checkpoint_path(ckpt_dir, cfg.epochs)
        write_json({"checkpoint": str(final), "epochs": cfg.epochs, "last": last}, out / "summary.json")
    return last


def _init_whitening(net: RetrievalNet, images, rt: Runtime, cfg: TrainConfig) -> None:
    """Initialise the whitening layer from learned whitening on mutual-NN pairs of the pool."""
    from retrieval.graph import mutual_nn_pairs
    from retrieval.knn import knn_search
    from retrieval.whitening import learn_lw_whitening, learn_pca_whitening

    F = embed_pool(net, images, rt, batch=cfg.embed_batch, head=False)
    _, I = knn_search(F, F, 2)
    pairs = mutual_nn_pairs(I)
    w = (learn_lw_whitening(F, pairs, dim=cfg.whiten_dim, shrinkage=0.1) if len(pairs) >= 2
         else learn_pca_whitening(F, dim=cfg.whiten_dim, shrinkage=0.1))
    if w.dim != cfg.whiten_dim:
        raise ValueError(f"train: whiten_dim {cfg.whiten_dim} exceeds what {len(F)} pool images support ({w.dim})")
    init_whitening(net.retrieval_head, w)
    log.info("train: whitening layer initialised (%s, %d pairs)", w.kind, len(pairs))


def _append_log(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after the checkpoint being resumed (they will be rerun)."""
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if int(r.get("epoch", 0)) <= epochs_done]
    if len(keep) != len(rows):
        write_bytes("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode(), path)


def local_engine(run_dir: Path, cfg: TrainConfig) -> dict:
    if cfg.num_workers != 1:
        log.warning("train: engine 'local' runs one worker; num_workers=%d is ignored", cfg.num_workers)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    return train_loop(run_dir, cfg, Runtime())


def ray_worker(config: dict) -> None:
    """One Ray Train worker (run by cluster.ray_train.run_workers): config {"run_dir", "train": the
    TrainConfig as a dict}; sets torch threads, then runs `train_loop` in the worker's context."""
    from cluster.ray_train import worker_context

    cfg = train_config_from_dict(config["train"])
    torch.set_num_threads(cfg.torch_threads if cfg.torch_threads > 0 else max(1, int(cfg.cpus_per_worker)))
    ctx = worker_context()
    rt = Runtime(rank=ctx.rank, world=ctx.world, device=ctx.device, wrap_model=ctx.wrap_model, report=ctx.report)
    train_loop(Path(config["run_dir"]), cfg, rt)


def ray_engine(run_dir: Path, cfg: TrainConfig) -> dict:
    """Fine-tune on Ray Train with cfg.num_workers workers (Ray started by the caller, see
    pipelines.run.start_engines); returns the last epoch's metrics."""
    from cluster.ray_train import run_workers

    run_dir = Path(run_dir).resolve()
    cfg = absolute_paths(cfg, Path.cwd())  # workers may run in another working directory
    out = train_dir(run_dir, cfg)
    result = run_workers(ray_worker, {"run_dir": str(run_dir), "train": config_to_dict(cfg)}, num_workers=cfg.num_workers,
                         use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker, storage_path=out / "ray", name="finetune")
    if result.error is not None:
        raise result.error
    log_path = out / "metrics.jsonl"  # rank 0's per-epoch log (Ray keeps metrics only with its own checkpoints)
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()] if log_path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


ENGINES = {"local": local_engine, "ray": ray_engine}


def run_train(run_dir: Path, cfg: TrainConfig) -> dict:
    """Train stage; returns {"checkpoint": path of the final checkpoint, "last": last epoch's metrics}."""
    if cfg.engine not in ENGINES:
        raise ValueError(f"train: unknown engine {cfg.engine!r}; known: {sorted(ENGINES)}")
    out = train_dir(run_dir, cfg)
    final = checkpoint_path(out / "checkpoints", cfg.epochs)
    if final.is_file():
        read_checkpoint(final)  # a damaged final checkpoint is an error, not a silent skip
        log.info("train: %s exists, nothing to do", final)
        return {"checkpoint": str(final), "last": {}}
    last = local_engine(run_dir, cfg) if cfg.engine == "local" else ray_engine(run_dir, cfg)
    return {"checkpoint": str(final), "last": last}


def train_config_from_dict(d: dict) -> TrainConfig:
    """TrainConfig from `dataclasses.asdict` output (unknown keys ignored)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in fields})
