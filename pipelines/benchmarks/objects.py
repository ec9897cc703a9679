"""Object discovery and regional diffusion: MAC, R-MAC, FS.EGM, OS.EGM x (kNN, alpha-QE, diffusion), and
regional diffusion on R-MAC and EGM regions, with memory per image and query time; plus the precision
of FS vs OS saliency on the objects' true boxes.

    python -m pipelines.benchmarks.objects --config deploy/configs/clutter.toml --out runs/objects-clutter
    python -m pipelines.benchmarks.objects --config deploy/configs/demo.toml --out runs/objects-demo

Each variant is a run of the product's own stages (extract, graph, query, evaluate) on the config's
ingested images, in OUT/<variant>. Writes OUT/results.json and OUT/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("objects")
# variant -> (pooling, region kind stored for regional diffusion, EGM region weighting)
VARIANTS = {"mac": ("mac", "rmac", "equal"), "rmac": ("rmac", "rmac", "equal"), "fs_egm": ("fs_egm", "fs_egm", "equal"),
            "os_egm": ("os_egm", "fs_egm", "equal"), "fs_egm_mass": ("fs_egm", "fs_egm", "mass"), "os_egm_mass": ("os_egm", "fs_egm", "mass")}
DEFAULT_VARIANTS = ["mac", "rmac", "fs_egm", "os_egm"]
REGIONAL_FROM = {"rmac": "R-MAC regions", "fs_egm": "EGM regions (FS map)"}  # variants whose run also ranks by regional diffusion


def _peak_terms(ex, fmap, f: np.ndarray, own: np.ndarray, pos: int, landmark_of_row: np.ndarray, landmark: str) -> tuple:
    """At map position `pos` of an image (its own region rows `own`, local-search scores f (M,)): the
    OS formula's neighbours N_p and what they bring: (share of N_p from images of the same landmark,
    mean centrality g, mean local-search score f, the sum over N_p of sim * f * g)."""
    from pipelines.discover import OS_NEIGHBOURS

    h, w = fmap.shape[-2:]
    u = fmap[0, :, pos // w, pos % w].detach().cpu().numpy().astype(np.float32)
    D, I = ex._search((u / max(np.linalg.norm(u), 1e-6))[None], OS_NEIGHBOURS + len(own))
    mine = set(own.tolist())
    keep = [j for j in range(I.shape[1]) if I[0, j] >= 0 and I[0, j] not in mine][:OS_NEIGHBOURS]
    d, i = D[0, keep], I[0, keep]
    return (float(np.mean(landmark_of_row[ex.owner[i]] == landmark)), float(ex.g[i].mean()), float(f[i].mean()),
            float((np.maximum(d, 0) * f[i] * ex.g[i]).sum()))


def saliency_precision(run: Path, cfg, gnd: dict, *, sample: int, seed: int = 0) -> dict:
    """Mean share of FS and OS saliency inside the landmark's true box over `sample` database views,
    all and split by the object's coverage of the frame (below / above 10%)."""
    import pyarrow.parquet as pq

    from pipelines.discover import ObjectSaliencyExtractor
    from pipelines.decode import prepare
    from retrieval.saliency import box_precision, egm_regions

    boxes = dict(zip(gnd["imlist"], gnd.get("db_boxes") or [None] * len(gnd["imlist"])))
    if not any(boxes.values()):
        raise ValueError("the benchmark's gnd.json has no db_boxes: rebuild it (delete its folder)")
    rows = []
    for p in sorted((run / "images").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["id", "key", "image", "width", "height"]).to_pylist()
        rows += [r for r in t if boxes.get(r["key"])]
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in sorted(rng.choice(len(rows), min(sample, len(rows)), replace=False))]
    ex = ObjectSaliencyExtractor(cfg.extract, run, own=True)
    out: dict[str, list] = {k: [] for k in ("fs", "os", "coverage", "fs_peak", "os_peak", "regions", "union", "covered", "terms")}
    # why the OS peak leaves the object: the landmark of every region's image (distractors: "")
    key_of: dict = {}
    for p in sorted((run / "images").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["id", "key"]).to_pydict()
        key_of.update(zip(t["id"], t["key"]))
    lm = dict(zip(gnd["imlist"], gnd.get("db_landmarks") or [""] * len(gnd["imlist"])))
    landmark_of_row = np.array([lm.get(key_of.get(int(i)), "") or "" for i in ex.ids], dtype=object)
    for r in rows:
        px, _ = prepare(r["image"], None, cfg.extract)
        (fmap, F, S), = ex.saliency([px], [r["id"]])
        h, w = fmap.shape[-2:]
        x0, y0, x1, y1 = boxes[r["key"]]
        cell = (y0 * h / r["height"], x0 * w / r["width"], y1 * h / r["height"], x1 * w / r["width"])
        inside = np.zeros((h, w))
        inside[int(cell[0]) : int(np.ceil(cell[2])), int(cell[1]) : int(np.ceil(cell[3]))] = 1
        union = np.zeros((h, w))
        regs = egm_regions(F)
        for ry, rx, rh, rw in regs:
            union[ry : ry + rh, rx : rx + rw] = 1
        out["fs"].append(box_precision(F, cell))
        out["os"].append(box_precision(S, cell))
        out["coverage"].append((x1 - x0) * (y1 - y0) / (r["width"] * r["height"]))
        out["fs_peak"].append(inside.flat[int(np.argmax(F))])  # is the map's maximum on the object?
        out["os_peak"].append(inside.flat[int(np.argmax(S))])
        out["regions"].append(len(regs))  # FS.EGM regions: how many, how much of the image, how much of the object
        out["union"].append(union.mean())
        out["covered"].append((union * inside).sum() / max(inside.sum(), 1))
        own = ex.rows_of[int(r["id"])]
        f = ex.solver.solve(np.ones((1, len(own)), np.float32), own[None].astype(np.int64))[0][:, 0]
        on_best = int(np.argmax(np.where(inside.ravel() > 0, S.ravel(), -1.0)))  # the OS map's best cell on the object
        pk, Fn = int(np.argmax(S)), F.ravel() / max(F.max(), 1e-12)
        terms = [(*_peak_terms(ex, fmap, f, own, cell, landmark_of_row, lm.get(r["key"], "")), Fn[cell]) for cell in (pk, on_best)]
        out["terms"].append([*terms[0], *terms[1]])
    fs, os_, cov = (np.array(out[k]) for k in ("fs", "os", "coverage"))
    res = {"images": len(rows), "fs": float(fs.mean()), "os": float(os_.mean()), "os_better": float((os_ > fs).mean()),
           "map_cells": [int(h), int(w)], "fs_peak_on_object": float(np.mean(out["fs_peak"])), "os_peak_on_object": float(np.mean(out["os_peak"])),
           "fs_egm_regions": float(np.mean(out["regions"])), "fs_egm_area": float(np.mean(out["union"])),
           "fs_egm_object_covered": float(np.mean(out["covered"]))}
    for name, sel in (("small", cov < 0.1), ("large", cov >= 0.1)):
        if sel.any():
            res[name] = {"images": int(sel.sum()), "fs": float(fs[sel].mean()), "os": float(os_[sel].mean())}
    # at the OS peak and at the OS map's best cell on the object, for views whose peak is off / on it
    T, off = np.array(out["terms"]), np.array(out["os_peak"]) == 0
    names = ("same_landmark", "g", "f", "sum", "fs")
    res["peak_terms"] = {grp: {"views": int(sel.sum()), "peak": dict(zip(names, T[sel, :5].mean(axis=0).tolist())),
                               "best_on_object": dict(zip(names, T[sel, 5:].mean(axis=0).tolist()))}
                         for grp, sel in (("peak_off_object", off), ("peak_on_object", ~off)) if sel.any()}
    res["g_median"] = float(np.median(ex.g))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/clutter.toml")
    ap.add_argument("--out", type=Path, default=Path("runs/objects-clutter"))
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--max-side", type=int, default=0, help="override [extract].max_side (feature-map resolution)")
    ap.add_argument("--whitening-dim", type=int, default=0,
                    help="override [extract].whitening_dim (global and regional vectors): rows named VARIANT-Dd, the CNN features reused")
    ap.add_argument("--saliency-sample", type=int, default=120, help="database views whose FS/OS box precision is measured")
    a = ap.parse_args(argv)
    from pipelines.benchmarks import ingested_run
    from pipelines.run import run_stages

    cfg, base = ingested_run(a.config)
    gnd = json.loads(Path(cfg.dataset.gnd).read_text())
    prev = a.out / "results.json"  # variants run before (another invocation) are kept; rerun ones replaced
    results: dict = json.loads(prev.read_text()) if prev.is_file() else {}
    results = {"config": a.config, "rows": results.get("rows", {}), "regional": results.get("regional", {}),
               **({"saliency": results["saliency"]} if "saliency" in results else {})}
    for name in a.variants:
        pooling, kind, weighting = VARIANTS[name]
        vcfg = copy.deepcopy(cfg)
        run = a.out / name
        vcfg.out, vcfg.benchmark.enabled = str(run), False  # the dataset is the base run's benchmark
        vcfg.extract.pooling, vcfg.extract.regions, vcfg.extract.region_kind = pooling, True, kind
        vcfg.extract.egm_weighting = weighting
        if a.max_side:
            vcfg.extract.max_side = a.max_side
        label, rlabel = name, REGIONAL_FROM.get(name)
        if a.whitening_dim:  # the same run folder: only whitening, graph and queries are redone
            vcfg.extract.whitening_dim = a.whitening_dim
            label, rlabel = f"{name}-{a.whitening_dim}d", f"{rlabel}, {a.whitening_dim}-d"
        vcfg.query.methods = ["knn", "aqe", "diffusion"] + (["regional"] if name in REGIONAL_FROM else [])
        for sub in ("images", "queries/images"):
            if not (run / sub).exists():
                (run / sub).parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(base / sub, run / sub)
        res = run_stages(vcfg, ["extract", "graph", "query", "evaluate"])
        metrics = json.loads((run / "metrics.json").read_text())
        man = json.loads((run / "manifest.json").read_text())
        nq = len(gnd["qimlist"])
        qsec = {m: (s.get("seconds") or 0.0) for m, s in res["query"].items() if isinstance(s, dict)}
        extract_s = json.loads((run / "timings.json").read_text()).get("extract")
        for m in ("knn", "aqe", "diffusion"):
            results["rows"][f"{label}/{m}"] = {**metrics[m], "bytes_per_image": 4 * man["dim"], "ms_per_query": 1e3 * qsec.get(m, 0) / nq,
                                              "extract_s": extract_s}
        if "regional" in metrics:
            rman = json.loads((run / "regions" / "manifest.json").read_text())
            results["regional"][rlabel] = {**metrics["regional"], "bytes_per_image": rman["bytes_per_image"],
                                                        "regions_per_image": rman["regions_per_image"],
                                                        "ms_per_query": 1e3 * qsec.get("regional", 0) / nq}
        if pooling == "os_egm" and weighting == "equal" and a.saliency_sample > 0:
            results["saliency"] = saliency_precision(run, vcfg, gnd, sample=a.saliency_sample)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| method | QE | E | M | H | bytes/image | ms/query |", "|---|---|---|---|---|---|---|"]
    for key, v in results["rows"].items():
        name, m = key.split("/")
        qe = {"knn": "none", "aqe": "alpha-QE", "diffusion": "diffusion"}[m]
        variant, _, dim = name.partition("-")  # "rmac-128d": R-MAC at 128 dimensions
        label = variant.upper().replace("_MASS", " (mass)").replace("_", ".") + (f", {dim[:-1]}-d" if dim else "")
        lines.append(f"| {label} | {qe} | {v['E']:.2f} | {v['M']:.2f} | {v['H']:.2f} | {v['bytes_per_image']:.0f} | "
                     f"{v['ms_per_query']:.2f} |")
    for regs, v in results["regional"].items():
        lines.append(f"| regional diffusion, {regs} ({v['regions_per_image']:.1f}/image) | - | {v['E']:.2f} | {v['M']:.2f} | {v['H']:.2f} | "
                     f"{v['bytes_per_image']:.0f} | {v['ms_per_query']:.2f} |")
    if "saliency" in results:
        s = results["saliency"]
        lines += ["", f"Saliency inside the true box (mean over {s['images']} database views): FS {s['fs']:.3f}, OS {s['os']:.3f} "
                      f"(OS higher on {100 * s['os_better']:.0f}% of views); the map's maximum on the object: FS "
                      f"{100 * s['fs_peak_on_object']:.0f}%, OS {100 * s['os_peak_on_object']:.0f}% ({s['map_cells'][0]}x{s['map_cells'][1]} "
                      f"cells); FS.EGM: {s['fs_egm_regions']:.1f} regions per image covering {100 * s['fs_egm_area']:.0f}% of it and "
                      f"{100 * s['fs_egm_object_covered']:.0f}% of the object"]
        for part in ("small", "large"):
            if part in s:
                lines.append(f"- object {'under' if part == 'small' else 'at least'} 10% of the frame ({s[part]['images']} views): "
                             f"FS {s[part]['fs']:.3f}, OS {s[part]['os']:.3f}")
    (a.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
