"""Ingest: images (folder, list of paths, or Parquet with bytes) -> Parquet shards with stable ids.

Output: `images/part-*.parquet` with `id` int64 (dense, in sorted key order over accepted images),
`key` string, `image` binary (the original encoded bytes), `width`/`height` int32 and, for query
sets, `bbox` (x0, y0, x1, y1); `rejects.parquet` with `key` and `reason` for every input that
could not be decoded. Shards are processed in order so ids stay dense; finished shards are
skipped on rerun.
"""
from __future__ import annotations

import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import IngestConfig, params_hash
from .shards import list_shards, read_json_or, read_table, shard_done, shard_name, write_json, write_table

log = logging.getLogger(__name__)

IMAGE_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("key", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bbox", pa.list_(pa.float32(), 4)),
    ]
)
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string())])


class IngestError(ValueError):
    """The input collection cannot be ingested at all (missing, empty, unsupported)."""


@dataclass(frozen=True)
class Source:
    """One input item: a key and either a file path or the encoded bytes; `reject` is the reason an
    item found while listing is refused without being read (a symbolic link leaving the folder, a
    special file)."""

    key: str
    path: str | None = None
    data: bytes | None = None
    reject: str | None = None

    def read(self) -> bytes:
        if self.reject is not None:
            raise ValueError(self.reject)
        if self.data is not None:
            return self.data
        return Path(self.path).read_bytes()


def list_sources(spec: str | Path, cfg: IngestConfig) -> list[Source]:
    """Enumerate inputs from a folder (recursive), a .txt list of paths, or a Parquet file.

    Keys are paths relative to the folder (or as listed); the result is sorted by key.
    """
    p = Path(spec)
    if not p.exists():
        raise IngestError(f"ingest: input {p} does not exist")
    exts = {e.lower() for e in cfg.extensions}
    if p.is_dir():
        out = _folder_sources(p, follow_symlinks=cfg.follow_symlinks)
        skipped = [s for s in out if s.path is not None and Path(s.path).suffix.lower() not in exts]
        if skipped:
            log.info("ingest: %d files without an image extension are recorded as rejects", len(skipped))
    elif p.suffix == ".parquet":
        t = pq.read_table(p)
        missing = {"key", "image"} - set(t.column_names)
        if missing:
            raise IngestError(f"ingest: {p} lacks column(s) {sorted(missing)}; expected `key` and `image` (bytes)")
        out = [Source(k, data=b) for k, b in zip(t.column("key").to_pylist(), t.column("image").to_pylist())]
    elif p.suffix in (".txt", ".lst", ".list"):
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        out = [Source(ln, path=str((p.parent / ln) if not Path(ln).is_absolute() else ln)) for ln in lines]
    else:
        raise IngestError(f"ingest: {p} is neither a folder, a .txt list nor a .parquet file")
    if not out:
        raise IngestError(f"ingest: no input files found in {p}")
    keys = [s.key for s in out]
    if len(set(keys)) != len(keys):
        raise IngestError(f"ingest: duplicate keys in {p}")
    return sorted(out, key=lambda s: s.key)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _folder_sources(root: Path, *, follow_symlinks: bool) -> list[Source]:
    """The files under the folder `root`, recursively (hidden files skipped), keyed by their path
    relative to it. Folders are descended whatever their name (a folder `y.jpg` is never an image).
    A symbolic link that leads outside `root` is a reject unless `follow_symlinks`; a link to a
    folder inside `root` is not descended (its files are listed where they are), and no folder is
    descended twice (link loops). Broken links and special files (FIFOs, sockets, devices) are
    rejects, never opened."""
    real_root = root.resolve()
    not_followed = "not followed ([ingest].follow_symlinks = false)"
    seen = {real_root}
    out: list[Source] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            sub = here / name
            real = sub.resolve()
            if sub.is_symlink():
                if _inside(real, real_root):
                    continue  # reached (or to be reached) under its own path
                if not follow_symlinks:
                    out.append(Source(str(sub.relative_to(root)),
                                      reject=f"symbolic link to a folder outside the dataset folder ({real}): {not_followed}"))
                    continue
            if real in seen:
                continue
            seen.add(real)
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            f = here / name
            key = str(f.relative_to(root))
            if f.is_symlink():
                real = f.resolve()
                if not f.exists():
                    out.append(Source(key, reject=f"broken symbolic link (to {real})"))
                    continue
                if not follow_symlinks and not _inside(real, real_root):
                    out.append(Source(key, reject=f"symbolic link to a file outside the dataset folder ({real}): {not_followed}"))
                    continue
            if not f.is_file():
                out.append(Source(key, reject="not a regular file"))
                continue
            out.append(Source(key, path=str(f)))
    return out


def image_header(data: bytes) -> tuple[int, int]:
    """(width, height) that encoded image bytes declare, read from the header without decoding the
    pixels (cheap: bounds decode work before any is done); ValueError if it is not an image."""
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except UnidentifiedImageError:
        raise ValueError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"corrupt image header: {e}") from None


def validate_image(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """Fully decode encoded image bytes; return (width, height) or raise ValueError with a reason."""
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ValueError(f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
                im.load()  # decodes everything: catches truncated files
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (unidentified format)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"corrupt or truncated image: {e}") from None
    if w < 8 or h < 8:
        raise ValueError(f"image too small: {w}x{h}")
    return w, h


def _refuse_other_collection(spec: str | Path, out_dir: Path, prev: dict) -> None:
    """IngestError when `out_dir` already holds the ingest (`prev`: its ingest.json) of another
    input: a run never replaces another collection's shards (the same input, grown or not, is
    ingested again in place)."""
    if not isinstance(prev, dict) or not (prev.get("source_abs") or prev.get("source")):
        return
    old = prev.get("source_abs") or str(Path(prev["source"]).resolve())
    new = str(Path(spec).resolve())
    if old != new:
        raise IngestError(f"ingest: {out_dir} already holds the images of {old}; this run ingests {new}. Choose another "
                          "output folder (`out` in the config, or --out), or delete that one to replace it")


def _write_chunk(chunk: list[Source], si: int, next_id: int, img_dir: Path, rej_dir: Path, cfg: IngestConfig, exts: set[str],
                 boxes: dict | None, params: str) -> tuple[int, int, int]:
    """Read, validate and write one shard (images + rejects); ids from `next_id` on.
    Returns (images written, rejects written, the next free id)."""
    rows = {k: [] for k in IMAGE_SCHEMA.names}
    rejects = {"key": [], "reason": []}
    for src in chunk:
        try:
            if src.reject is not None:
                raise ValueError(src.reject)
            if src.path is not None and Path(src.path).suffix.lower() not in exts:
                raise ValueError(f"unsupported extension {Path(src.path).suffix!r}")
            data = src.read()
            w, h = validate_image(data, max_pixels=cfg.max_pixels)
        except (ValueError, OSError) as e:
            rejects["key"].append(src.key)
            rejects["reason"].append(str(e))
            continue
        rows["id"].append(next_id)
        rows["key"].append(src.key)
        rows["image"].append(data)
        rows["width"].append(w)
        rows["height"].append(h)
        rows["bbox"].append([float(v) for v in boxes[src.key]] if boxes and src.key in boxes else None)
        next_id += 1
    write_table(pa.table(rows, schema=IMAGE_SCHEMA), img_dir / shard_name(si), params=params)
    write_table(pa.table(rejects, schema=REJECT_SCHEMA), rej_dir / shard_name(si), params=params)
    return len(rows["id"]), len(rejects["key"]), next_id


def _all_sources(spec, added: list[str], cfg: IngestConfig) -> list[Source]:
    """The sources of the input and of every batch added to it (`retrieval add`); keys must be unique."""
    sources = list_sources(spec, cfg)
    seen = {s.key for s in sources}
    for extra in added:
        more = list_sources(extra, cfg)
        clash = sorted(seen & {s.key for s in more})
        if clash:
            raise IngestError(f"ingest: {extra} has {len(clash)} image key(s) the collection already holds (e.g. {clash[:3]}): "
                              "keys are paths relative to their folder; put the new images under a subfolder of their own")
        seen |= {s.key for s in more}
        sources += more
    return sources


def ingest_added(new: str | Path, out_dir: str | Path, cfg: IngestConfig) -> dict:
    """Add the images of `new` (folder, list or Parquet) to a finished ingest in `out_dir`: they
    get the next ids in new shards, nothing else is read or rewritten, and later reruns of the
    ingest keep them (the batch is recorded in ingest.json)."""
    out_dir = Path(out_dir)
    prev = out_dir / "ingest.json"
    if not prev.is_file():
        raise IngestError(f"add: {out_dir} has no finished ingest to add to: run `retrieval ingest` (or `run`) first")
    info = json.loads(prev.read_text())
    new_abs = str(Path(new).resolve())
    if not Path(new).exists():
        raise IngestError(f"add: {new} does not exist")
    added = info.get("added", []) + ([new_abs] if new_abs not in info.get("added", []) else [])
    spec = info.get("source_abs") or info["source"]
    sources = _all_sources(spec, added, cfg)
    cfg_hash = info.get("cfg_hash")
    if cfg_hash != params_hash({"cfg": cfg, "boxes": {}}):
        raise IngestError(f"add: the [ingest] settings differ from those {out_dir} was ingested with: adding would renumber; "
                          "use the same settings")
    grown = _append_new(spec, sources, out_dir, cfg, {e.lower() for e in cfg.extensions}, None, cfg_hash, added=added)
    if grown is None:
        raise IngestError(f"add: images of {out_dir} are no longer in their inputs: rerun `retrieval ingest` first")
    return grown


def _append_new(spec, sources: list[Source], out_dir: Path, cfg: IngestConfig, exts: set[str], boxes: dict | None,
                cfg_hash: str, *, added: list[str] = ()) -> dict | None:
    """Grow a finished ingest of the same input with its new images only: existing shards and ids
    stay as they are, new images get the next ids in new shards. None (ingest anew) when images of
    the previous ingest left the input."""
    img_dir, rej_dir = out_dir / "images", out_dir / "rejects"
    known: dict[str, int] = {}
    for p in list_shards(img_dir):
        t = read_table(p, ["id", "key"])
        known.update(zip(t.column("key").to_pylist(), t.column("id").to_pylist()))
    rejected = {k for p in list_shards(rej_dir) for k in read_table(p, ["key"]).column("key").to_pylist()}
    gone = (set(known) | rejected) - {s.key for s in sources}
    if gone:
        log.warning("ingest: %d image(s) of the previous ingest are no longer in %s (e.g. %s): ingesting anew, ids may change",
                    len(gone), spec, sorted(gone)[:3])
        return None
    new = [s for s in sources if s.key not in known and s.key not in rejected]
    si = len(list_shards(img_dir))
    next_id = max(known.values(), default=-1) + 1
    if new:
        where = f"{spec} and {len(added)} added batch(es), the last {added[-1]}" if added else spec
        log.info("ingest: %d new image(s) in %s: appended from id %d, existing ids unchanged", len(new), where, next_id)
    for i in tqdm(range(0, len(new), cfg.shard_size), desc="ingest (new images)", unit="shard", disable=not new):
        _, _, next_id = _write_chunk(new[i:i + cfg.shard_size], si, next_id, img_dir, rej_dir, cfg, exts, boxes,
                                     params=f"append:{cfg_hash}:{si}:{next_id}")
        si += 1
    return _finish(spec, out_dir, si, cfg_hash, appended=len(new), added=list(added))


def _finish(spec, out_dir: Path, n_shards: int, cfg_hash: str, **extra) -> dict:
    """rejects.parquet and ingest.json from the shards on disk; the summary."""
    img_dir, rej_dir = out_dir / "images", out_dir / "rejects"
    n_img = sum(pq.read_metadata(p).num_rows for p in list_shards(img_dir))
    rej = [read_table(p) for p in list_shards(rej_dir)]
    all_rejects = pa.concat_tables(rej) if rej else pa.table({"key": [], "reason": []}, schema=REJECT_SCHEMA)
    params = params_hash({"cfg_hash": cfg_hash, "shards": n_shards, "images": n_img, "rejects": len(all_rejects)})
    write_table(all_rejects.replace_schema_metadata(None), out_dir / "rejects.parquet", params=params)
    for key, reason in zip(all_rejects.column("key").to_pylist()[:20], all_rejects.column("reason").to_pylist()[:20]):
        log.warning("ingest: rejected %s: %s", key, reason)
    summary = {"images": n_img, "rejects": len(all_rejects), "shards": n_shards, "source": str(spec),
               "source_abs": str(Path(spec).resolve()), "params": params, "cfg_hash": cfg_hash, **extra}
    if n_img == 0:
        raise IngestError(f"ingest: none of the {len(all_rejects)} inputs in {spec} is a readable image "
                          f"(see {out_dir / 'rejects.parquet'})")
    write_json(summary, out_dir / "ingest.json")
    log.info("ingest: %d images in %d shards, %d rejects -> %s", n_img, n_shards, len(all_rejects), img_dir)
    return summary


def ingest(
    spec: str | Path,
    out_dir: str | Path,
    cfg: IngestConfig,
    *,
    boxes: dict[str, Iterable[float]] | None = None,
) -> dict:
    """Ingest a collection into `out_dir/images` and `out_dir/rejects.parquet`.

    Ids never change as a collection grows: over a finished ingest of the same input with the same
    settings, only the images not seen before are read, appended with the next ids in new shards.
    Otherwise (first ingest, other settings, images removed) the input is ingested from scratch,
    finished shards of an interrupted ingest skipped.

    Args:
        boxes: optional key -> (x0, y0, x1, y1) query boxes stored in the `bbox` column.
    Returns: summary dict (images, rejects, shards), also written to `out_dir/ingest.json`.
    """
    out_dir = Path(out_dir)
    prev = read_json_or(out_dir / "ingest.json", {})
    _refuse_other_collection(spec, out_dir, prev)
    added = prev.get("added", [])
    sources = _all_sources(spec, added, cfg)
    exts = {e.lower() for e in cfg.extensions}
    cfg_hash = params_hash({"cfg": cfg, "boxes": boxes or {}})
    if prev.get("cfg_hash") == cfg_hash:
        grown = _append_new(spec, sources, out_dir, cfg, exts, boxes, cfg_hash, added=added)
        if grown is not None:
            return grown
    phash = params_hash({"cfg": cfg, "keys": [s.key for s in sources], "boxes": boxes or {}})
    img_dir, rej_dir = out_dir / "images", out_dir / "rejects"
    chunks = [sources[i : i + cfg.shard_size] for i in range(0, len(sources), cfg.shard_size)]
    next_id = 0
    for si, chunk in enumerate(tqdm(chunks, desc="ingest", unit="shard")):
        path, rpath = img_dir / shard_name(si), rej_dir / shard_name(si)
        shard_params = f"{phash}:{si}:{next_id}"
        if shard_done(path, params=shard_params) and shard_done(rpath, params=shard_params):
            log.debug("ingest: shard %d done, skipping", si)
            next_id += pq.read_metadata(path).num_rows
            continue
        _, _, next_id = _write_chunk(chunk, si, next_id, img_dir, rej_dir, cfg, exts, boxes, params=shard_params)
    # drop shards of an earlier, larger ingest into the same folder
    for stale in list_shards(img_dir)[len(chunks) :] + list_shards(rej_dir)[len(chunks) :]:
        stale.unlink()
    if not chunks:
        raise IngestError(f"ingest: none of the {len(sources)} inputs in {spec} is a readable image (see {out_dir / 'rejects.parquet'})")
    return _finish(spec, out_dir, len(chunks), cfg_hash, added=list(added))
