"""Ground-truth readers: official Revisited (.pkl), classic (.mat) and the benchmark's gnd.json.

All return a `GroundTruth` with 0-based indices into `imlist`.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GroundTruth:
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]  # per query: revisited {'easy','hard','junk'} or classic {'ok','junk'}; 'bbx' optional
    protocol: str  # "revisited" or "classic"
    extra: dict = field(default_factory=dict)


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be read: refused pickle content, truncated or malformed file."""


class GroundTruthRefused(GroundTruthError, pickle.UnpicklingError):
    """A ground-truth pickle that names a class or function: refused, never loaded."""


class _Refused(pickle.UnpicklingError):
    """The pickle names a class or function (the only way a pickle runs code)."""


class _SafeUnpickler(pickle.Unpickler):
    """Allows only plain containers and numbers: the official gnd files need nothing else."""

    def find_class(self, module, name):
        raise _Refused(f"gnd pickle refers to {module}.{name}; only plain data is accepted")


def _ints(v) -> list[int]:
    import numpy as np

    return [int(x) for x in np.asarray(v).ravel()]


def read_revisited_pkl(path: Path) -> GroundTruth:
    with open(path, "rb") as f:
        d = _SafeUnpickler(f).load()
    gnd = [{k: (_ints(v) if k != "bbx" else [float(x) for x in v]) for k, v in g.items()} for g in d["gnd"]]
    return GroundTruth(list(d["imlist"]), list(d["qimlist"]), gnd, "revisited")


def read_classic_mat(path: Path) -> GroundTruth:
    """Classic Oxford5k/Paris6k/Holidays/INSTRE .mat: 1-based 'ok'/'junk' become 0-based."""
    import numpy as np
    import scipy.io as sio

    m = sio.loadmat(path)
    flat = lambda a: [str(np.asarray(x).ravel()[0]) for x in np.asarray(a).ravel()]  # noqa: E731
    imlist = flat(m["imlist"])
    if "qimlist" in m:
        qimlist = flat(m["qimlist"])
    else:
        qimlist = [imlist[int(q) - 1] for q in np.asarray(m["qidx"]).ravel()]
    gnd = []
    g = np.asarray(m["gnd"]).ravel()
    for e in g:
        entry = {"ok": [i - 1 for i in _ints(e["ok"])], "junk": [i - 1 for i in _ints(e["junk"])] if "junk" in e.dtype.names else []}
        if "bbx" in e.dtype.names:
            entry["bbx"] = [float(x) for x in np.asarray(e["bbx"]).ravel()]
        gnd.append(entry)
    return GroundTruth(imlist, qimlist, gnd, "classic")


def read_benchmark_json(path: Path) -> GroundTruth:
    d = json.loads(Path(path).read_text())
    extra = {k: v for k, v in d.items() if k not in ("imlist", "qimlist", "gnd")}
    return GroundTruth(d["imlist"], d["qimlist"], d["gnd"], "revisited", extra)


def read_ground_truth(path: str | Path) -> GroundTruth:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth file not found: {path}")
    readers = {".pkl": read_revisited_pkl, ".mat": read_classic_mat, ".json": read_benchmark_json}
    if path.suffix not in readers:
        raise GroundTruthError(f"ground truth {path}: unsupported format {path.suffix!r} (expected .pkl, .mat or .json)")
    try:
        return readers[path.suffix](path)
    except _Refused as e:
        raise GroundTruthRefused(f"ground truth {path} refused: {e}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, GroundTruthError):
            raise
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise GroundTruthError(f"ground truth {path} is malformed or truncated ({what})") from None
