"""Fine-tuning checkpoints: written atomically, read with `torch.load(weights_only=True)`, tagged
with their format and architecture so a wrong or damaged file is a clear `CheckpointError`."""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError
from .shards import write_bytes

log = logging.getLogger(__name__)
FORMAT = "retrieval.finetune"
VERSION = 1
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")


class CheckpointError(WeightsError):
    """A fine-tuning checkpoint is corrupt, not a checkpoint, or from another architecture."""


def checkpoint_path(ckpt_dir: Path, epoch: int) -> Path:
    return Path(ckpt_dir) / f"epoch-{epoch:04d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of `epoch-XXXX.pt` files, ascending (temporary files are ignored)."""
    out = []
    for p in Path(ckpt_dir).glob("epoch-*.pt"):
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(path: Path, *, net, optimizer, epoch: int, step: int, mining: dict, config: dict) -> None:
    """Model (its `arch` and state_dict), optimiser state, epochs done, steps, mining state, config.

    Only tensors and plain data are stored, so the file loads with weights_only=True."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "arch": dict(net.arch),
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "mining": json.dumps(mining, default=_plain),
        "config": json.dumps(config, default=_plain),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(buf.getvalue(), path)


def _plain(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_checkpoint(path: Path) -> dict:
    """Load and validate a checkpoint; `mining` and `config` come back as dicts.

    Raises CheckpointError when the file is unreadable/truncated, is not a fine-tuning checkpoint,
    or has an unknown version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, refused global: all mean "not a usable checkpoint"
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    return validate_checkpoint(state, path)


def validate_checkpoint(state: Any, path: Path | str) -> dict:
    if not is_checkpoint(state):
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint (no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')!r}; this code reads version {VERSION}")
    missing = [k for k in ("arch", "model", "epoch", "step", "mining", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    state = dict(state)
    try:
        state["mining"] = json.loads(state["mining"])
        state["config"] = json.loads(state["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has unreadable mining/config state: {e}") from None
    return state


def net_from_checkpoint(state: dict, *, backbone: str | None = None, path: Path | str = "", whiten_dim: int | None = None):
    """A `RetrievalNet` with the checkpoint's weights. `backbone` / `whiten_dim`, when given, must
    match the checkpoint's architecture (else CheckpointError naming both)."""
    from retrieval.backbones import BACKBONES, make_backbone
    from retrieval.finetune_net import RetrievalNet

    arch = state["arch"]
    name = arch.get("backbone")
    if backbone is not None and name != backbone:
        raise CheckpointError(f"checkpoint {path} was trained for backbone {name!r}, but {backbone!r} is configured")
    if whiten_dim is not None and int(arch.get("whiten_dim", 0)) != int(whiten_dim):
        raise CheckpointError(f"checkpoint {path} has whiten_dim {arch.get('whiten_dim')}, but {whiten_dim} is configured")
    if name not in BACKBONES:
        raise CheckpointError(f"checkpoint {path} names unknown backbone {name!r}; available: {BACKBONES}")
    net = RetrievalNet(make_backbone(name), backbone_name=name, whiten_dim=int(arch.get("whiten_dim", 0)),
                       learn_p=bool(arch.get("learn_p", True)))
    try:
        net.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit architecture {arch}: {str(e)[:300]}") from None
    return net


def load_finetuned(path: Path, *, backbone: str | None = None):
    """(RetrievalNet in eval mode, checkpoint state) from a checkpoint file."""
    state = read_checkpoint(path)
    net = net_from_checkpoint(state, backbone=backbone, path=path)
    net.eval()
    return net, state
