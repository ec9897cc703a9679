"""`retrieval import-descriptors` is all or nothing: every input is checked before anything is
written, the import is swapped in by renames, and a failure at any point leaves the previous run
whole; unusable .npy files and options are refused with one line."""
from __future__ import annotations

import os
import pathlib
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.descriptors import DescriptorError, load_descriptors
from pipelines.import_descriptors import import_descriptors

MARKER = Path("/tmp/retrieval-import-test-unpickled")


class Boom:
    """Unpickling this touches MARKER: proof that a .npy's pickle was (not) loaded."""

    def __reduce__(self):
        return (pathlib.Path.touch, (MARKER,))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Staging or set-aside folders of an import, beside the run directory."""
    return sorted(p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}."))


@pytest.fixture
def first_run(tmp_path):
    """A run made by a first import (database, keys, queries, query keys), and its files."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "db.npy", rng.normal(size=(40, 8)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.normal(size=(5, 8)).astype(np.float32))
    (tmp_path / "keys.txt").write_text("\n".join(f"img{i}.jpg" for i in range(40)))
    (tmp_path / "qkeys.txt").write_text("\n".join(f"query{i}.jpg" for i in range(5)))
    np.save(tmp_path / "db2.npy", rng.normal(size=(30, 8)).astype(np.float32))
    np.save(tmp_path / "q2.npy", rng.normal(size=(4, 8)).astype(np.float32))
    (tmp_path / "bad-qkeys.txt").write_text("only\ntwo\n")
    out = tmp_path / "run"
    (out / "graph").mkdir(parents=True)
    (out / "graph" / "keep.txt").write_text("not the import's")  # other content of the run is left alone
    assert main(["import-descriptors", str(tmp_path / "db.npy"), "--keys", str(tmp_path / "keys.txt"), "--queries",
                 str(tmp_path / "q.npy"), "--query-keys", str(tmp_path / "qkeys.txt"), "--out", str(out), "--shard-size", "16"]) == 0
    return tmp_path, out, tree(out)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_a_failing_query_keys_file_leaves_the_previous_run_whole(first_run, capsys):
    d, out, before = first_run
    capsys.readouterr()
    rc = main(["import-descriptors", str(d / "db2.npy"), "--queries", str(d / "q2.npy"), "--query-keys", str(d / "bad-qkeys.txt"),
               "--out", str(out)])
    assert rc == 2 and "bad-qkeys.txt lists 2 keys for 4 descriptors" in _one_error_line(capsys)
    assert tree(out) == before and not leftovers(out)
    _, keys, X = load_descriptors(out / "descriptors")
    assert X.shape == (40, 8) and keys[0] == "img0.jpg"


def test_a_failure_while_writing_leaves_the_previous_run_whole(first_run, monkeypatch):
    import pipelines.import_descriptors as imp

    d, out, before = first_run
    real, calls = imp.write_descriptors, {"n": 0}

    def fail_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected: disk full")
        return real(*a, **k)

    monkeypatch.setattr(imp, "write_descriptors", fail_on_third)
    with pytest.raises(OSError, match="injected"):
        import_descriptors(out, d / "db2.npy", queries=d / "q2.npy", shard_size=8)
    assert tree(out) == before and not leftovers(out)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_failure_while_swapping_puts_the_previous_run_back(first_run, monkeypatch, fail_at):
    d, out, before = first_run
    real, calls = os.rename, {"n": 0}

    def flaky_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("injected rename failure")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="injected"):
        import_descriptors(out, d / "db2.npy", queries=d / "q2.npy", shard_size=8)
    monkeypatch.setattr(os, "rename", real)
    assert tree(out) == before and not leftovers(out)


def test_a_successful_import_replaces_the_whole_descriptor_set(first_run):
    d, out, _ = first_run
    import_descriptors(out, d / "db2.npy", shard_size=8)  # no query file this time
    ids, keys, X = load_descriptors(out / "descriptors")
    assert X.shape == (30, 8) and keys[0] == "db00000000" and len(list((out / "descriptors").glob("part-*"))) == 4
    assert not (out / "queries" / "descriptors").exists() and not (out / "queries" / "manifest.json").exists()
    assert (out / "graph" / "keep.txt").read_text() == "not the import's" and not leftovers(out)
    import_descriptors(out, d / "db.npy", queries=d / "q.npy")
    assert load_descriptors(out / "queries" / "descriptors")[2].shape == (5, 8)


def _npy(path: Path, arr) -> Path:
    np.save(path, arr, allow_pickle=True)
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "complex": (lambda p: _npy(p, (np.ones((5, 4)) + 1j * np.ones((5, 4))).astype(np.complex64)), "must be real numbers"),
    "zero-rows": (lambda p: _npy(p, np.zeros((0, 8), np.float32)), "0 rows"),
    "zero-dims": (lambda p: _npy(p, np.zeros((5, 0), np.float32)), "0 dimensions"),
    "empty-array": (lambda p: _npy(p, np.zeros((0,), np.float32)), "2-D matrix"),
    "empty-file": (lambda p: _raw(p, b""), "not a readable .npy"),
    "truncated": (lambda p: _raw(p, b"\x93NUMPY\x01\x00garb"), "not a readable .npy"),
    "strings": (lambda p: _npy(p, np.array([["a", "b"], ["c", "d"]])), "must be real numbers"),
    "bytes": (lambda p: _npy(p, np.array([[b"a", b"b"]])), "must be real numbers"),
    "booleans": (lambda p: _npy(p, np.ones((3, 4), bool)), "must be real numbers"),
    "pickled-objects": (lambda p: _npy(p, np.array([[Boom(), 1.0]], dtype=object)), "pickled Python objects"),
    "not-npy": (lambda p: _raw(p, b"\x80\x04garbage that is not a numpy file"), "pickled Python objects"),
    "overflow": (lambda p: _npy(p, np.full((3, 8), 1e300)), "NaN/inf"),  # beyond float32 once converted
    "float32-norm-overflow": (lambda p: _npy(p, np.full((3, 8), 3e38, np.float32)), "norm beyond float32"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unusable_npy_files_are_refused_with_one_line(first_run, capsys, case):
    d, out, before = first_run
    MARKER.unlink(missing_ok=True)
    make, msg = BAD_FILES[case]
    path = make(d / f"{case}.npy")
    capsys.readouterr()
    assert main(["import-descriptors", str(path), "--out", str(out)]) == 2
    assert msg in _one_error_line(capsys)
    assert tree(out) == before and not leftovers(out)
    assert not MARKER.exists()  # nothing was unpickled
    # the same file as the query set is refused too, the database being fine
    assert main(["import-descriptors", str(d / "db2.npy"), "--queries", str(path), "--out", str(out)]) == 2
    assert msg in _one_error_line(capsys) and tree(out) == before and not MARKER.exists()


@pytest.mark.parametrize("args,msg", [
    (["--keys", "{d}/missing-keys.txt"], "keys file not found"),
    (["--queries", "{d}/q2.npy", "--query-keys", "{d}/missing-qkeys.txt"], "keys file not found"),
    (["--query-keys", "{d}/qkeys.txt"], "without a query descriptor file"),
    (["--shard-size", "0"], "shard size must be a positive integer, got 0"),
    (["--shard-size", "-5"], "shard size must be a positive integer, got -5"),
    (["--keys", "{d}/db.npy"], "not readable UTF-8 text"),
])
def test_bad_options_are_refused_with_one_line(first_run, capsys, args, msg):
    d, out, before = first_run
    capsys.readouterr()
    assert main(["import-descriptors", str(d / "db2.npy"), "--out", str(out)] + [a.format(d=d) for a in args]) == 2
    assert msg in _one_error_line(capsys)
    assert tree(out) == before and not leftovers(out)


def test_refusals_also_hold_for_the_python_api(tmp_path):
    np.save(tmp_path / "db.npy", np.ones((3, 4), np.float32))
    with pytest.raises(DescriptorError, match="shard size"):
        import_descriptors(tmp_path / "run", tmp_path / "db.npy", shard_size=0)
    with pytest.raises(DescriptorError, match="shard size"):
        import_descriptors(tmp_path / "run", tmp_path / "db.npy", shard_size=True)
    assert not (tmp_path / "run").exists() and not leftovers(tmp_path / "run")


def test_a_new_run_directory_is_created_whole(tmp_path):
    np.save(tmp_path / "db.npy", np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32))
    import_descriptors(tmp_path / "deep" / "run", tmp_path / "db.npy")
    assert load_descriptors(tmp_path / "deep" / "run" / "descriptors")[2].shape == (10, 4)
    assert oct((tmp_path / "deep" / "run").stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert not leftovers(tmp_path / "deep" / "run")


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
