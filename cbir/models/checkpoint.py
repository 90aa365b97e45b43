"""Self-describing checkpoints (safetensors with the spec in the header) and foreign weight files:
loaded without unpickling anything."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from cbir.errors import ModelError
from cbir.models.extractor import SPEC_KEY, Extractor, ExtractorSpec, MultiScaleBackbone
from cbir.models.registry import build_backbone, resolve_backbone


def _load_failure(path: Path, exc: Exception) -> str:
    """Why ``path`` did not load, on one line: torch's own messages run over many lines (or are a
    bare number, for a file that is no PyTorch file at all)."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if refused:
        return (f"it holds Python objects besides tensors ({refused.group(1)}), and cbir unpickles nothing "
                f"but tensors (weights_only=True); save the model's state_dict instead")
    kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
    return f"not a complete {kind} weights file (damaged, cut short, or another format)"


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], ExtractorSpec | None]:
    """Tensors and, for a cbir checkpoint, its spec; never unpickles arbitrary objects."""
    if path.is_dir():
        best = path / "best.safetensors"
        hint = f"; its best checkpoint is {best}" if best.is_file() else ""
        raise ModelError(f"{path}: a folder, not a weights file{hint}")
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}
            spec = ExtractorSpec.from_json(metadata[SPEC_KEY]) if SPEC_KEY in metadata else None
            return state, spec
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{path}: cannot load weights: {_load_failure(path, exc)}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return state, None


def load_checkpoint(path: str | Path) -> Extractor:
    """Rebuild the extractor a cbir checkpoint describes."""
    path = Path(path)
    state, spec = read_state(path)
    if spec is None:
        raise ModelError(f"{path}: not a cbir checkpoint (no {SPEC_KEY} metadata); "
                         "pass it with --extractor NAME to load it as backbone weights")
    module = build_backbone(resolve_backbone(spec.architecture), spec.input_size)
    extractor = Extractor(spec, MultiScaleBackbone(module) if spec.multiscale else module,
                          _head(state), state.get("classifier"))
    try:
        extractor.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match {spec.architecture}: {exc}") from exc
    return extractor.eval()


def _head(state: dict[str, torch.Tensor]) -> nn.Module | None:
    if "head.weight" not in state:
        return None
    out_dim, in_dim = state["head.weight"].shape
    return nn.Linear(in_dim, out_dim)


def strip_prefixes(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Accept weights saved from a wrapper ("module.", "backbone.", "model." prefixes)."""
    for prefix in ("module.", "backbone.", "model.", "features."):
        if not any(k in reference for k in state) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state

