"""Object discovery at extraction (`[extract].pooling = "os_egm"`, Simeoni et al.).

Two passes over the images, both through the extraction engines (in-process or Ray actors):

1. FS.EGM: global vectors and regional vectors (EGM regions of each image's FS map) -> `features/`;
2. the region index of the database (`pipelines.regions`: whitened regional vectors and their
   reciprocal kNN graph) and the regions' Katz centrality g, solved once (`regions/centrality.npy`);
3. OS.EGM: each image is forwarded again; its local search f (diffusion on the region graph from
   the image's own regions: database images seed their own region nodes, queries their regions'
   nearest region nodes), the OS map S(p) = F^(p) sum_{i in N_p} sim(v_i, u_p) f_i g_i (own regions
   left out of N_p), EGM regions re-detected on S, max-pooled, L2-normalised and summed ->
   `os_features/`, whitened into `descriptors/` as any pooling.

Local descriptors u_p are mapped through the regional whitening before they are compared with the
(whitened) regional vectors v_i.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.pooling import egm_pooling, egm_regional, l2n
from retrieval.rankers import KnnRanker
from retrieval.regional import katz_centrality, region_solver
from retrieval.saliency import fs_map, os_map

from .config import ExtractConfig, GraphConfig, params_hash
from .decode import to_input
from .extractor import DescriptorExtractor
from .rankers import GRAPH_ROWS_READER
from .regions import load_region_index, load_region_whitening, run_region_graph
from .shards import read_json, write_bytes

log = logging.getLogger(__name__)

OS_NEIGHBOURS = 10  # |N_p|: region neighbours of each position
OS_KQ = 5  # region nodes seeded per query region (queries only; database images seed their own)
OS_ALPHA = 0.99
# region graphs up to this many nodes get the exact local search under os_solver = "auto": it costs
# O(graph) per batch of images (at 149,198 region nodes 16 images' OS embedding took 3.96 s with it,
# 0.55 s truncated: BENCHMARKS.md, "Object discovery at 10^5 images"), so the pass would grow as N^2
OS_EXACT_MAX = 20_000


def first_pass(cfg: ExtractConfig) -> ExtractConfig:
    """The FS.EGM pass of an os_egm extraction: global FS.EGM vectors plus their EGM regions."""
    return dataclasses.replace(cfg, pooling="fs_egm", regions=True, region_kind="fs_egm", region_whitening=False)


def centrality(run_dir: Path, cfg: ExtractConfig) -> np.ndarray:
    """Katz centrality of the region graph's nodes, solved once per region index and kept: block CG
    in this process, or (`os_solver = "petsc"`) on MPI ranks that read the graph's row blocks."""
    rdir = run_dir / "regions"
    params = read_json(rdir / "manifest.json").get("params")
    path = rdir / "centrality.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["params"]) == str(params):
                return z["g"]
    if cfg.os_solver == "petsc":
        from cluster.petsc_solver import katz_with_mpiexec

        g, stats = katz_with_mpiexec(rdir / "graph", reader=GRAPH_ROWS_READER, ranks=cfg.os_petsc_ranks, alpha=OS_ALPHA)
        converged, residual = bool(stats["converged"].all()), float(stats["residuals"].max())
    else:
        g, st = katz_centrality(load_region_index(run_dir).W, alpha=OS_ALPHA)
        converged, residual = bool(st.converged.all()), float(st.residuals.max())
    if not converged:
        log.warning("discover: region centrality did not converge (residual %.2e)", residual)
    import io

    buf = io.BytesIO()
    np.savez(buf, g=g, params=np.array(str(params)))
    write_bytes(buf.getvalue(), path)
    return g


class ObjectSaliencyExtractor:
    """Image pixels -> OS.EGM descriptors, with the database's region index (see the module docstring).

    Args: cfg: the extraction settings (backbone, max_side); run_dir: the database run (its `regions/`
    and `descriptors`-order ids); own: the images are the database's (their region nodes seed the
    local search and are left out of N_p) or not (queries).
    """

    def __init__(self, cfg: ExtractConfig, run_dir: str | Path, *, own: bool):
        self.base = DescriptorExtractor(first_pass(dataclasses.replace(cfg, scales=[1.0])))
        self.cfg, self.own = cfg, own
        run_dir = Path(run_dir)
        petsc = cfg.os_solver == "petsc"
        idx = load_region_index(run_dir, graph=not petsc)
        self.owner, self.ids = idx.owner, idx.ids  # region -> row, row -> database image id
        self.rknn = KnnRanker(idx.V)
        if petsc:  # every region's score of the local search, from ranks that read the stored graph
            from cluster.petsc_ranker import PetscScores

            self.solver = PetscScores(run_dir / "regions" / "graph", len(idx.V), reader=GRAPH_ROWS_READER, keep=len(idx.V),
                                      ranks=cfg.os_petsc_ranks, alpha=OS_ALPHA)
        else:  # exact local search on region graphs up to OS_EXACT_MAX nodes ("auto"), truncated above
            self.solver = region_solver(self.rknn, idx.V, idx.W, alpha=OS_ALPHA, kq=OS_KQ, exact_max=OS_EXACT_MAX,
                                        solver=cfg.os_solver)
        self.g = centrality(run_dir, cfg)
        self.white = load_region_whitening(run_dir)
        starts = np.searchsorted(self.owner, np.arange(len(self.ids) + 1))
        self.rows_of = {int(i): np.arange(starts[r], starts[r + 1]) for r, i in enumerate(self.ids)}

    @property
    def dim(self) -> int:
        return self.base.dim

    def _search(self, U: np.ndarray, k: int):
        return self.rknn.search(self.white.apply(U), k)

    @torch.no_grad()
    def embed(self, pixels: Sequence[np.ndarray], geoms: Sequence[Sequence[float]], ids: Sequence[int] | None = None) -> dict:
        """{"vector": (B, C) float32 L2-normalised OS.EGM descriptors} of `prepare`d images."""
        out = np.empty((len(pixels), self.dim), np.float32)
        for j, (fmap, _, S) in enumerate(self.saliency(pixels, ids)):
            v = egm_pooling(fmap, torch.from_numpy(S[None]).to(fmap.dtype), weighting=self.cfg.egm_weighting)
            out[j] = l2n(v)[0].cpu().numpy()
        return {"vector": out}

    @torch.no_grad()
    def saliency(self, pixels: Sequence[np.ndarray], ids: Sequence[int] | None = None) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """Per image: its feature map (1, C, H, W), FS map (H, W) and OS map (H, W) float64."""
        m = self.base.model
        fmaps, fsmaps, seeds = [], [], []
        for j, px in enumerate(pixels):
            x = torch.from_numpy(to_input(np.asarray(px, dtype=np.uint8), max_side=self.cfg.max_side, mean=m.input_mean, std=m.input_std))[None]
            fmap = self.base.features(x)
            fmaps.append(fmap)
            fsmaps.append(fs_map(fmap))
            own = self.rows_of.get(int(ids[j]), np.zeros(0, np.int64)) if self.own and ids is not None else np.zeros(0, np.int64)
            if len(own):  # a database image: its own region nodes are the seeds
                seeds.append((np.ones(len(own), np.float32), own, own))
            else:  # a query: its FS.EGM regions' nearest region nodes
                vecs, _ = egm_regional(fmap, fsmaps[-1])
                D, I = self.rknn.search(self.white.apply(vecs[0].cpu().numpy()), OS_KQ)
                seeds.append((D.ravel(), I.ravel(), np.zeros(0, np.int64)))
        width = max(len(s[1]) for s in seeds) if seeds else 1
        Ds = np.zeros((len(seeds), width), np.float32)
        Is = np.full((len(seeds), width), -1, np.int64)
        for j, (d, i, _) in enumerate(seeds):
            Ds[j, : len(d)], Is[j, : len(i)] = d, i
        if not seeds:
            return []
        F_all, _ = self.solver.solve(Ds, Is)  # local search of every image of the batch: one block CG
        out = []
        for j, fmap in enumerate(fmaps):
            F = fsmaps[j][0]
            S = os_map(fmap[0], F, self._search, F_all[:, j], self.g, k=OS_NEIGHBOURS, exclude=seeds[j][2])
            out.append((fmap, F.cpu().numpy().astype(np.float64), S))
        return out


def os_pass(run_dir: Path, out_dir: Path, cfg: ExtractConfig, gcfg: GraphConfig, *, features: str):
    """What the OS.EGM pass of `out_dir` (the database run or its queries) needs, once the FS.EGM pass
    is in `out_dir/features`: the database's region index and centrality are built (database only),
    then (make, extra_params): the extractor factory for the engines and what its output depends on.
    `features`: the FS.EGM pass's parameters (`pipelines.extract.feature_params`)."""
    own = out_dir.resolve() == run_dir.resolve()
    if own:
        run_region_graph(run_dir, gcfg, first_pass(cfg), features=features)
        centrality(run_dir, cfg)
    rman = read_json(run_dir / "regions" / "manifest.json")
    make = functools.partial(ObjectSaliencyExtractor, cfg, str(run_dir), own=own)
    # the database's shards are keyed by the index's lineage, which survives growth (`retrieval add`):
    # earlier images keep the OS descriptors of the smaller collection, as they keep its whitening,
    # and only new images are forwarded again; queries are keyed by the index as it is now
    regions = (rman.get("lineage") or rman.get("params")) if own else rman.get("params")
    key = {"regions": regions, "own": own, "k": OS_NEIGHBOURS, "kq": OS_KQ}
    if cfg.os_solver != "auto":  # a solver set by hand: its descriptors are redone (PETSc's solve is the exact one);
        key["solver"] = "exact" if cfg.os_solver == "petsc" else cfg.os_solver  # "auto" keeps the keys it always had
    return make, params_hash(key)


def _heat(img: np.ndarray, S: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 image with the (H, W) map S, upsampled and normalised, blended over it in a
    blue-to-red colour scale."""
    from PIL import Image

    h, w = img.shape[:2]
    s = np.asarray(S, np.float64)
    s = (s - s.min()) / max(s.max() - s.min(), 1e-12)
    up = np.asarray(Image.fromarray((s * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float64) / 255.0
    colour = np.stack([np.clip(2 * up, 0, 1), np.clip(2 - np.abs(4 * up - 2), 0, 1), np.clip(2 - 2 * up, 0, 1)], axis=-1)
    return (0.45 * img + 0.55 * 255 * colour).clip(0, 255).astype(np.uint8)


def saliency_html(run_dir: Path, cfg: ExtractConfig, *, n: int = 6, size: int = 160) -> str:
    """An HTML section for the report: `n` database images (spread over the ids) with their FS and
    OS maps as heat maps side by side."""
    import base64
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from .decode import prepare

    rows = []
    for p in sorted((run_dir / "images").glob("part-*.parquet")):
        rows += pq.read_table(p, columns=["id", "key", "image"]).to_pylist()
    if not rows or n <= 0:
        return ""
    pick = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, n).round().astype(int))]
    ex = ObjectSaliencyExtractor(cfg, run_dir, own=True)

    def uri(a: np.ndarray) -> str:
        im = Image.fromarray(a)
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    cells = []
    for r in pick:
        px, _ = prepare(r["image"], None, cfg)
        (_, F, S), = ex.saliency([px], [r["id"]])
        cells.append(f"<tr><td>{r['key']}</td>" + "".join(f"<td><img src='{uri(a)}'></td>" for a in (px, _heat(px, F), _heat(px, S)))
                     + "</tr>")
    return ("<h2>Object discovery: FS and OS saliency</h2><p>Feature saliency (FS: sparse channels of this image) and object "
            "saliency (OS: what the image shares with the rest of the collection, through the region graph), red = salient.</p>"
            "<table><tr><th>image</th><th>photo</th><th>FS map</th><th>OS map</th></tr>" + "".join(cells) + "</table>")
