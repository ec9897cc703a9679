import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import IngestConfig
from pipelines.ingest import IngestError, ingest


def _jpeg(seed=0, size=(40, 30)) -> bytes:
    a = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    return buf.getvalue()


def _png_bomb(w=30000, h=30000) -> bytes:
    """A tiny PNG file that declares a w x h grey image (a decompression bomb)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (w + 1) * 16)  # only a few rows of data: it is the header that matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(5):
        (d / f"ok_{i}.jpg").write_bytes(_jpeg(i))
    (d / "sub" / "ok_nested.jpg").write_bytes(_jpeg(9))
    (d / "notes.txt").write_text("not an image")
    (d / "fake.jpg").write_bytes(b"this is not a jpeg at all")
    (d / "truncated.jpg").write_bytes(_jpeg(7, (200, 200))[:400])
    (d / "bomb.png").write_bytes(_png_bomb())
    (d / "empty.jpg").write_bytes(b"")
    return d


def test_bad_inputs_are_recorded_rejects(folder, tmp_path):
    out = tmp_path / "run"
    s = ingest(folder, out, IngestConfig(shard_size=3))
    assert s["images"] == 6 and s["rejects"] == 5
    rej = pq.read_table(out / "rejects.parquet").to_pydict()
    reasons = dict(zip(rej["key"], rej["reason"]))
    assert "unsupported extension" in reasons["notes.txt"]
    assert "not an image" in reasons["fake.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "too large" in reasons["bomb.png"] or "decompression bomb" in reasons["bomb.png"]
    assert "empty" in reasons["empty.jpg"]
    imgs = pa.concat_tables([pq.read_table(p) for p in sorted((out / "images").glob("part-*.parquet"))])
    assert imgs.column("id").to_pylist() == list(range(6))  # dense
    assert imgs.column("key").to_pylist() == sorted(imgs.column("key").to_pylist())
    assert "sub/ok_nested.jpg" in imgs.column("key").to_pylist()
    assert imgs.column("width").to_pylist()[0] == 40


def test_decompression_bomb_caught_by_pillow_guard_too(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "bomb.png").write_bytes(_png_bomb())
    (d / "ok.jpg").write_bytes(_jpeg())
    ingest(d, tmp_path / "run", IngestConfig(max_pixels=10**12))  # our limit off: Pillow's must fire
    reasons = pq.read_table(tmp_path / "run" / "rejects.parquet").column("reason").to_pylist()
    assert any("decompression bomb" in r for r in reasons)


def test_empty_and_missing_inputs_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no input files found"):
        ingest(tmp_path / "empty", tmp_path / "run", IngestConfig())
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope", tmp_path / "run", IngestConfig())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"xx")
    with pytest.raises(IngestError, match="none of the 1 inputs"):
        ingest(tmp_path / "junk", tmp_path / "run2", IngestConfig())


def test_parquet_and_list_inputs(folder, tmp_path):
    t = pa.table({"key": ["b", "a"], "image": [_jpeg(1), _jpeg(2)]})
    pq.write_table(t, tmp_path / "in.parquet")
    s = ingest(tmp_path / "in.parquet", tmp_path / "r1", IngestConfig())
    assert s["images"] == 2
    got = pq.read_table(tmp_path / "r1" / "images" / "part-00000.parquet").to_pydict()
    assert got["key"] == ["a", "b"] and got["image"][0] == _jpeg(2)
    (tmp_path / "list.txt").write_text("imgs/ok_1.jpg\nimgs/ok_0.jpg\n")
    assert ingest(tmp_path / "list.txt", tmp_path / "r2", IngestConfig())["images"] == 2


def test_rerun_skips_finished_shards_and_resumes_after_crash(folder, tmp_path, monkeypatch):
    import pipelines.ingest as ing

    out = tmp_path / "run"
    real = ing.write_table
    calls = {"n": 0}

    def crashing(table, path, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # shards 0 and 1 written (images+rejects each), crash in shard 2
            raise KeyboardInterrupt("injected crash")
        return real(table, path, **kw)

    monkeypatch.setattr(ing, "write_table", crashing)
    with pytest.raises(KeyboardInterrupt):
        ingest(folder, out, IngestConfig(shard_size=3))
    assert not (out / "images" / "part-00002.parquet").exists()
    assert not list((out / "images").glob(".*tmp"))  # no partial file left behind
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("part-*.parquet")}
    monkeypatch.setattr(ing, "write_table", real)
    s = ingest(folder, out, IngestConfig(shard_size=3))
    for name, m in mtimes.items():
        assert (out / "images" / name).stat().st_mtime_ns == m  # finished shards not rewritten
    ref = ingest(folder, tmp_path / "ref", IngestConfig(shard_size=3))
    assert s["images"] == ref["images"]
    for p in sorted((tmp_path / "ref" / "images").glob("part-*.parquet")):
        assert pq.read_table(p).equals(pq.read_table(out / "images" / p.name))


def test_a_run_never_replaces_another_collections_shards(folder, tmp_path):
    """Issue 12 item 1: ingesting another input into a folder that holds a collection is refused
    (shards untouched); the same input, grown, is ingested in place."""
    out = tmp_path / "run"
    first = ingest(folder, out, IngestConfig(shard_size=3))
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.jpg").write_bytes(_jpeg(3))
    with pytest.raises(IngestError, match="already holds the images of"):
        ingest(other, out, IngestConfig(shard_size=3))
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before
    (folder / "zz_new.jpg").write_bytes(_jpeg(11))
    grown = ingest(folder, out, IngestConfig(shard_size=3))
    assert grown["images"] == first["images"] + 1


def test_a_config_without_out_writes_to_a_folder_named_after_it(tmp_path):
    from pipelines.config import load_config

    cfg = tmp_path / "holiday-photos.toml"
    cfg.write_text('[dataset]\ndatabase = "x"\n')
    assert load_config(cfg).out == "runs/holiday-photos"
    cfg.write_text('out = "elsewhere"\n')
    assert load_config(cfg).out == "elsewhere"


def test_stages_out_of_order_say_which_stage_to_run_first(tmp_path):
    """Issue 12 item 4: checked before any engine starts."""
    from pipelines.config import RunConfig
    from pipelines.run import missing_inputs, run_stages

    cfg = RunConfig(out=str(tmp_path / "r"))
    (tmp_path / "r").mkdir()
    assert "run the ingest stage first" in missing_inputs(cfg, tmp_path / "r", ["extract"])
    assert missing_inputs(cfg, tmp_path / "r", ["ingest", "extract", "graph", "query", "evaluate"]) is None
    with pytest.raises(ValueError, match="no descriptors yet: run the extract stage first"):
        run_stages(cfg, ["graph"])
    cfg.query.methods = ["knn"]
    assert "extract stage first" in missing_inputs(cfg, tmp_path / "r", ["query"])
    assert "query stage first" in missing_inputs(cfg, tmp_path / "r", ["evaluate"])
    (tmp_path / "r" / "descriptors").mkdir()  # descriptors there (as after extract or import-descriptors), no graph
    (tmp_path / "r" / "manifest.json").write_text("{}")
    assert missing_inputs(cfg, tmp_path / "r", ["query"]) is None  # kNN needs no graph
    cfg.query.methods = ["knn", "diffusion"]
    assert "no graph yet: run the graph stage first" in missing_inputs(cfg, tmp_path / "r", ["query"])


def _ids_by_key(out):
    t = pa.concat_tables([pq.read_table(p, columns=["id", "key"]) for p in sorted((out / "images").glob("part-*.parquet"))])
    return dict(zip(t.column("key").to_pylist(), t.column("id").to_pylist()))


def test_ids_never_change_as_images_are_added(folder, tmp_path, monkeypatch, caplog):
    """Issue 13 / the mission: images added to the input (keys sorting before and after the old
    ones) get the next ids in new shards; old shards and ids are untouched; a crash while
    appending resumes; a removed image makes ingest start anew, said in a warning."""
    import logging

    import pipelines.ingest as ing

    out = tmp_path / "run"
    ingest(folder, out, IngestConfig(shard_size=3))
    before_ids = _ids_by_key(out)
    before_bytes = {p.name: p.read_bytes() for p in (out / "images").glob("part-*.parquet")}
    for name, seed in [("aa_first.jpg", 21), ("mm_middle.jpg", 22), ("zz_last.jpg", 23), ("zz_last2.jpg", 24)]:
        (folder / name).write_bytes(_jpeg(seed))
    real, calls = ing.write_table, {"n": 0}

    def crashing(table, path, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the first new shard written (images + rejects), crash in the second
            raise KeyboardInterrupt("injected crash")
        return real(table, path, **kw)

    monkeypatch.setattr(ing, "write_table", crashing)
    with pytest.raises(KeyboardInterrupt):
        ingest(folder, out, IngestConfig(shard_size=3))
    monkeypatch.setattr(ing, "write_table", real)
    grown = ingest(folder, out, IngestConfig(shard_size=3))
    ids = _ids_by_key(out)
    assert {k: ids[k] for k in before_ids} == before_ids  # nothing renumbered
    new = {k: v for k, v in ids.items() if k not in before_ids}
    assert sorted(new) == ["aa_first.jpg", "mm_middle.jpg", "zz_last.jpg", "zz_last2.jpg"]
    assert sorted(new.values()) == list(range(max(before_ids.values()) + 1, max(before_ids.values()) + 5))
    for name, data in before_bytes.items():
        assert (out / "images" / name).read_bytes() == data
    assert grown["images"] == len(before_ids) + 4 and grown["appended"] == 1  # the crash had written a shard of 3 new ones
    again = ingest(folder, out, IngestConfig(shard_size=3))  # nothing new: nothing written
    assert again["appended"] == 0 and _ids_by_key(out) == ids
    (folder / "ok_0.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="pipelines.ingest"):
        ingest(folder, out, IngestConfig(shard_size=3))
    assert "no longer in" in caplog.text and "ids may change" in caplog.text


def test_retrieval_add_appends_a_batch_and_reruns_keep_it(folder, tmp_path):
    """Issue 13: `add` appends another folder's images with the next ids; a later rerun of the
    ingest keeps them (and their ids); a batch whose keys clash is refused with a reason."""
    from pipelines.ingest import ingest_added

    out = tmp_path / "run"
    ingest(folder, out, IngestConfig(shard_size=3))
    before = _ids_by_key(out)
    batch = tmp_path / "batch" / "flickr"
    batch.mkdir(parents=True)
    for i in range(4):
        (batch / f"d{i}.jpg").write_bytes(_jpeg(40 + i))
    res = ingest_added(tmp_path / "batch", out, IngestConfig(shard_size=3))
    ids = _ids_by_key(out)
    assert res["appended"] == 4 and {k: ids[k] for k in before} == before
    assert sorted(v for k, v in ids.items() if k.startswith("flickr/")) == list(range(max(before.values()) + 1, max(before.values()) + 5))
    again = ingest(folder, out, IngestConfig(shard_size=3))  # the input's own rerun keeps the added batch
    assert again["appended"] == 0 and _ids_by_key(out) == ids
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "ok_1.jpg").write_bytes(_jpeg(50))
    with pytest.raises(IngestError, match="already holds"):
        ingest_added(clash, out, IngestConfig(shard_size=3))
    with pytest.raises(IngestError, match="no finished ingest"):
        ingest_added(batch, tmp_path / "empty", IngestConfig())
