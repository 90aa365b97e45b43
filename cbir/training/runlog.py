"""A training run's folder: its CSV log, its resumable state, and the best epoch by validation."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from cbir.errors import CbirError
from cbir.files import written_whole
from cbir.models.extractor import Extractor
from cbir.training.config import TrainConfig


def run_shape(config: TrainConfig, extractor: Extractor, class_names: list[str]) -> dict:
    """The settings that shape a run's saved state: a resumed run must be given the same."""
    return {"--model": config.model, "--input-size": extractor.spec.input_size, "--num-features": config.num_features,
            "--loss": config.loss, "--optimizer": config.optimizer, "--freeze": config.freeze,
            "--dr-model": config.dr_model, "--train-blocks": config.train_blocks, "classes": class_names}


def resumed_state(path: Path, shape: dict, extractor: Extractor, loss, optimizer) -> dict:
    """Load ``path`` into the extractor, loss, optimizer and random generator; its other entries."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file raises whatever torch's unpickler meets first
        raise CbirError(f"cannot resume {path}: not a readable training state ({type(exc).__name__}); "
                        "start afresh without --load") from exc
    saved = state.get("shape", shape)  # states of earlier versions carry none
    changed = [f"{key} {shown_in_log(saved.get(key))} -> {shown_in_log(value)}" for key, value in shape.items() if saved.get(key) != value]
    if changed:
        raise CbirError(f"cannot resume {path}: this run changes what the saved state was trained as "
                        f"({'; '.join(changed)}); give the first run's flags, or start afresh without --load")
    try:
        extractor.load_state_dict(state["extractor"])
        loss.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CbirError(f"cannot resume {path}: it does not fit this run's flags "
                        f"({str(exc).strip().splitlines()[0]}); start afresh without --load") from exc
    torch.set_rng_state(state["rng"])
    return state


def shown_in_log(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ", ".join(value) if isinstance(value, list) else str(value)


def keep_log_rows(path: Path, last_epoch: int) -> None:
    """Drop the log's rows after ``last_epoch``: a run stopped between its log line and its state
    repeats that epoch when resumed."""
    if not path.exists():
        return
    rows = log_rows(path)
    kept = [row for row in rows if int(row["epoch"]) <= last_epoch]
    if len(kept) < len(rows):
        with written_whole(path) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)


def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def log_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def best_row(path: Path) -> dict:
    rows = log_rows(path)
    return max(rows, key=lambda r: (float(r["precision_at_1"]), float(r["mean_average_precision_at_r"]))) if rows else {}

