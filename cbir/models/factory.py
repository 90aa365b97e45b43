"""create_extractor: a backbone from the registry, with offline, hub or checkpoint weights."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from cbir.errors import ModelError
from cbir.models.checkpoint import load_checkpoint, read_state, strip_prefixes
from cbir.models.extractor import POOLINGS, Extractor, ExtractorSpec, MultiScaleBackbone
from cbir.models.registry import build_backbone, resolve_backbone


def create_extractor(name: str = "efficientnet_lite0", weights: str | Path | None = None,
                     input_size: int | None = None, pretrained: bool = True,
                     embedding_dim: int | None = None, device: str | None = None,
                     multiscale: bool = False, pooling: str = "avg", flip: bool = False) -> Extractor:
    """An extractor ready for indexing.

    ``weights`` may be a cbir checkpoint (it then describes itself and ``name`` is ignored) or a
    backbone state dict (``.pth``/``.pt``/``.safetensors``) for ``name``, e.g. KimiaNet for
    densenet121. With neither, ImageNet weights come from a local package where one exists
    (efficientnet_lite0) or are downloaded by timm (needs internet); ``pretrained=False`` keeps
    random weights. ``embedding_dim`` adds a (to be trained) linear head of that size;
    ``multiscale`` wraps the backbone in :class:`MultiScaleBackbone` (needs ``embedding_dim``).
    ``pooling`` ("avg" or "gem") and ``flip`` (test-time augmentation) apply to checkpoints too.
    """
    if pooling not in POOLINGS:
        raise ModelError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
    if multiscale and not embedding_dim:
        raise ModelError("the multi-scale (Deep Ranking) model needs an embedding size to project to")
    if weights is not None:
        state, spec = read_state(Path(weights))
        if spec is not None:
            extractor = load_checkpoint(weights)
            _check_pooling(extractor, pooling)
            extractor.spec = replace(extractor.spec, pooling=pooling, flip=flip)
            return extractor.for_inference(device)
    backbone = resolve_backbone(name)
    size = input_size or backbone.input_size
    module = build_backbone(backbone, size)
    if weights is not None:
        reference = module.state_dict()
        state = strip_prefixes(state, reference)
        missing, _ = module.load_state_dict(state, strict=False)
        if missing:
            raise ModelError(f"{weights}: not weights of {backbone.name} "
                             f"({len(missing)} tensors missing, e.g. {missing[0]})")
        source = Path(weights).name
    elif pretrained and backbone.offline_weights is not None:
        module.load_state_dict(backbone.offline_weights())
        source = "imagenet"
    elif pretrained:
        from cbir.models.hub import download_pretrained  # timm and the hub client: seconds to import

        module = download_pretrained(backbone, size)
        source = "imagenet"
    else:
        source = "random"
    if multiscale:
        module = MultiScaleBackbone(module)
    feature_dim = module.num_features
    head = nn.Linear(feature_dim, embedding_dim) if embedding_dim and embedding_dim != feature_dim else None
    spec = ExtractorSpec(architecture=backbone.name, input_size=size, mean=backbone.mean,
                         std=backbone.std, embedding_dim=embedding_dim or feature_dim,
                         head=head is not None, weights=source, interpolation=backbone.interpolation,
                         multiscale=multiscale, pooling=pooling, flip=flip)
    extractor = Extractor(spec, module, head)
    _check_pooling(extractor, pooling)
    return extractor.for_inference(device)


def _check_pooling(extractor: Extractor, pooling: str) -> None:
    if pooling == "gem" and (extractor.spec.multiscale or resolve_backbone(extractor.spec.architecture).fixed_input_size):
        raise ModelError(f"GeM pooling needs a convolutional backbone's feature map; {extractor.spec.description} "
                         "has none to pool")

