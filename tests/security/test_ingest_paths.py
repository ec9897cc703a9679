"""Ingest of a folder: symbolic links that leave it are refused (recorded as rejects) unless
[ingest].follow_symlinks = true; folders are descended whatever their name and never taken for
images; broken links and special files are rejects, never opened."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import IngestConfig, load_config
from pipelines.ingest import ingest


def _jpeg(seed: int) -> bytes:
    a = (np.random.default_rng(seed).random((30, 40, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    return buf.getvalue()


def _result(out):
    imgs = pa.concat_tables([pq.read_table(p) for p in sorted((out / "images").glob("part-*.parquet"))])
    rej = pq.read_table(out / "rejects.parquet").to_pydict()
    return imgs.column("key").to_pylist(), dict(zip(rej["key"], rej["reason"]))


@pytest.fixture
def dataset(tmp_path):
    d, outside = tmp_path / "data", tmp_path / "outside"
    (d / "sub").mkdir(parents=True)
    outside.mkdir()
    (d / "ok.jpg").write_bytes(_jpeg(0))
    (d / "sub" / "nested.jpg").write_bytes(_jpeg(1))
    (outside / "secret.jpg").write_bytes(_jpeg(2))
    (outside / "more").mkdir()
    (outside / "more" / "other.jpg").write_bytes(_jpeg(3))
    (d / "leak.jpg").symlink_to(outside / "secret.jpg")  # a file outside the folder
    (d / "leakdir").symlink_to(outside / "more")  # a folder outside it
    (d / "alias.jpg").symlink_to(d / "ok.jpg")  # inside: fine
    (d / "subalias").symlink_to(d / "sub")  # a folder inside: its files are listed once, under sub/
    (d / "loop").symlink_to(d)  # a loop
    (d / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (d / "y.jpg").mkdir()  # a folder named like an image
    (d / "y.jpg" / "inner.jpg").write_bytes(_jpeg(4))
    return d


def test_links_leaving_the_folder_are_rejects_by_default(dataset, tmp_path):
    ingest(dataset, tmp_path / "run", IngestConfig())
    keys, rejects = _result(tmp_path / "run")
    assert keys == ["alias.jpg", "ok.jpg", "sub/nested.jpg", "y.jpg/inner.jpg"]
    assert "outside the dataset folder" in rejects["leak.jpg"] and "follow_symlinks" in rejects["leak.jpg"]
    assert "folder outside the dataset folder" in rejects["leakdir"]
    assert "broken symbolic link" in rejects["dangling.jpg"]
    assert set(rejects) == {"leak.jpg", "leakdir", "dangling.jpg"}  # the folder y.jpg is neither an image nor a reject


def test_following_links_is_an_explicit_option(dataset, tmp_path):
    ingest(dataset, tmp_path / "run", IngestConfig(follow_symlinks=True))
    keys, rejects = _result(tmp_path / "run")
    assert keys == ["alias.jpg", "leak.jpg", "leakdir/other.jpg", "ok.jpg", "sub/nested.jpg", "y.jpg/inner.jpg"]
    assert set(rejects) == {"dangling.jpg"}
    cfg = load_config(_toml(tmp_path, "[ingest]\nfollow_symlinks = true\n"))
    assert cfg.ingest.follow_symlinks and not IngestConfig().follow_symlinks


def _toml(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_a_folder_named_like_an_image_in_a_path_list_is_a_reject(dataset, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{dataset / 'ok.jpg'}\n{dataset / 'y.jpg'}\n")
    ingest(lst, tmp_path / "run", IngestConfig())
    keys, rejects = _result(tmp_path / "run")
    assert keys == [str(dataset / "ok.jpg")] and list(rejects) == [str(dataset / "y.jpg")]


@pytest.mark.timeout(60)
def test_special_files_are_rejects_and_never_opened(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "ok.jpg").write_bytes(_jpeg(0))
    os.mkfifo(d / "pipe.jpg")  # opening it to read would block forever
    ingest(d, tmp_path / "run", IngestConfig())
    keys, rejects = _result(tmp_path / "run")
    assert keys == ["ok.jpg"] and rejects == {"pipe.jpg": "not a regular file"}
