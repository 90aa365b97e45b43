"""The model of a database: recorded when it is created, rebuilt for queries."""
from __future__ import annotations

from pathlib import Path

from cbir.errors import ModelError, ModelMismatchError
from cbir.models.extractor import Extractor, ExtractorSpec
from cbir.models.factory import create_extractor
from cbir.store.database import VectorStore


def register_model(store: VectorStore, extractor: Extractor, weights: str | Path | None = None,
                   chunk_size: int | None = None) -> None:
    """Create the database for this extractor, or refuse if it holds another model's vectors."""
    spec = {"description": extractor.spec.description, "spec": extractor.spec.to_json()}
    if weights is not None:
        spec["weights_path"] = str(Path(weights).resolve())
    store.ensure_model(extractor.fingerprint(), spec, extractor.spec.embedding_dim, chunk_size)


def extractor_for_store(store: VectorStore, weights: str | Path | None = None,
                        device: str | None = None) -> Extractor:
    """Rebuild the extractor that filled ``store`` (or load ``weights``) and check it is the same."""
    store.require()
    recorded = store.model_spec
    spec = ExtractorSpec.from_json(recorded["spec"])
    weights = weights or recorded.get("weights_path")
    if weights is not None and not Path(weights).exists():
        raise ModelError(f"database '{store.name}' was built with weights {weights}, which are not "
                         "on this machine; pass their new location with --weights")
    if weights is not None:
        extractor = create_extractor(spec.architecture, weights=weights, input_size=spec.input_size,
                                     device=device, pooling=spec.pooling, flip=spec.flip)
    else:
        extractor = create_extractor(spec.architecture, input_size=spec.input_size,
                                     pretrained=spec.weights == "imagenet", device=device, pooling=spec.pooling,
                                     flip=spec.flip)
    if extractor.fingerprint() != store.model:
        raise ModelMismatchError(f"the extractor rebuilt for database '{store.name}' "
                                 f"({extractor.spec.description}) does not reproduce its vectors; "
                                 "pass the original --weights")
    return extractor

