"""Feature extractors: a registry of timm backbones, an optional embedding head, L2-normalised output.

An :class:`ExtractorSpec` describes a model completely (architecture, input size, normalisation,
embedding size, class names, training config); a checkpoint is a safetensors file that carries
its spec in the header, so nothing is unpickled and no flag needs repeating. The fingerprint
(hash of spec and weights) is what a database records to refuse vectors of another model.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import CbirError, ModelError
from cbir.files import written_whole
from cbir.models.preprocess import Preprocess

SPEC_KEY = "cbir_spec"
VECTOR_FIELDS = ("architecture", "input_size", "mean", "std", "embedding_dim", "head", "weights", "interpolation",
                 "multiscale", "pooling", "flip")
POOLINGS = ("avg", "gem")
GEM_POWER = 3.0  # generalised mean pooling (Radenovic et al., TPAMI 2018): p = 3, their fixed choice


@dataclass(frozen=True)
class ExtractorSpec:
    """Everything needed to rebuild an extractor and to judge whether two are the same."""

    architecture: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embedding_dim: int
    head: bool = False  # a linear embedding head after the pooled backbone features
    weights: str = "random"  # "imagenet", "random" or the file the weights came from
    class_names: tuple[str, ...] = ()
    training: dict = field(default_factory=dict)
    interpolation: str = "bicubic"  # how images are resized to input_size
    classifier_scale: float = 0.0  # logit scale of the classifier head, when there is one
    multiscale: bool = False  # Deep Ranking: backbone + two shallow branches on sub-sampled images
    pooling: str = "avg"  # of the backbone's last feature map: "avg" (its own) or "gem"
    flip: bool = False  # test-time augmentation: the mean of the image's and its mirror image's features

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExtractorSpec":
        data = json.loads(text)
        for key in ("mean", "std", "class_names"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    @property
    def description(self) -> str:
        trained = f", {self.training['loss']}-trained head" if self.training.get("loss") else ""
        scales = ", multi-scale" if self.multiscale else ""
        options = (", GeM pooling" if self.pooling == "gem" else "") + (", flip-averaged" if self.flip else "")
        return f"{self.architecture} ({self.weights} weights, {self.input_size}px{scales}{options}{trained})"


class Extractor(nn.Module):
    """Backbone (pooled features) -> optional linear head -> L2 normalisation.

    A trained extractor may also carry a cosine classifier (one weight vector per class of
    ``spec.class_names``): class probabilities for the kNN/classifier interpolation protocol.
    It does not change the vectors, so it is not part of the fingerprint.
    """

    def __init__(self, spec: ExtractorSpec, backbone: nn.Module, head: nn.Module | None = None,
                 classifier: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head
        self.classifier = None if classifier is None else nn.Parameter(classifier, requires_grad=False)
        # Not persistent: part of the spec, so neither in checkpoints nor in the fingerprint's tensors.
        self.register_buffer("_scale", 1.0 / (255.0 * torch.tensor(spec.std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("_shift", torch.tensor(spec.mean).view(1, 3, 1, 1) / torch.tensor(spec.std).view(1, 3, 1, 1),
                             persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (as Preprocess makes them) -> the float input the backbone was trained on."""
        return images.float() * self._scale - self._shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of uint8 image batches (normalised here) or of already normalised floats."""
        if images.dtype == torch.uint8:
            images = self.normalise(images)
        features = self.pooled(images)
        if self.spec.flip:
            features = (features + self.pooled(images.flip(-1))) / 2
        return self.project(features)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings of pooled backbone features: the head, where there is one, then L2 normalisation."""
        if self.head is not None:
            features = self.head(features)
        return F.normalize(features, dim=1)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features of normalised images, pooled as the spec says."""
        if self.spec.pooling == "avg":
            return self.backbone(images)
        maps = self.backbone.forward_features(images).clamp(min=1e-6)
        return maps.pow(GEM_POWER).mean(dim=(2, 3)).pow(1 / GEM_POWER)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.spec.input_size, self.spec.interpolation)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def for_inference(self, device: str | torch.device | None = None) -> "Extractor":
        """Evaluation mode on ``device``, channels-last (faster convolutions on CPU)."""
        retain_freed_memory()
        return self.to(_device(device), memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """L2-normalised float32 embeddings of a preprocessed batch."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self(images).float().cpu().numpy()

    def set_classifier(self, weights: torch.Tensor, scale: float) -> None:
        """Attach class weights (classes x embedding size) in ``spec.class_names`` order."""
        if weights.shape != (len(self.spec.class_names), self.spec.embedding_dim):
            raise ModelError(f"classifier of shape {tuple(weights.shape)} does not fit "
                             f"{len(self.spec.class_names)} classes x {self.spec.embedding_dim} dims")
        self.classifier = nn.Parameter(weights.detach().float().clone(), requires_grad=False)
        self.spec = replace(self.spec, classifier_scale=float(scale))

    def class_probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """softmax(scale · cosine(vector, class weight)) over ``spec.class_names``."""
        if self.classifier is None:
            raise ModelError(f"{self.spec.description} has no classifier head")
        weights = F.normalize(self.classifier.detach().float().cpu(), dim=1)
        logits = self.spec.classifier_scale * torch.from_numpy(np.ascontiguousarray(vectors, np.float32)) @ weights.T
        return torch.softmax(logits, dim=1).numpy()

    def fingerprint(self) -> str:
        """Hash of the spec (without training notes) and every weight: equal iff same vectors."""
        # Only what shapes the vectors: notes, class names or a classifier added later do not.
        # Options at their defaults are left out: fingerprints from before they existed stay valid.
        defaults = ExtractorSpec("", 0, (), (), 0)
        shaping = {k: v for k, v in asdict(self.spec).items()
                   if k in VECTOR_FIELDS and not (k in ("pooling", "flip") and v == getattr(defaults, k))}
        digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode())
        for name, tensor in self.state_dict().items():
            if name == "classifier":
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """A self-describing safetensors checkpoint."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with written_whole(path) as partial:
            save_file(state, str(partial), metadata={SPEC_KEY: self.spec.to_json()})
        return path


class MultiScaleBackbone(nn.Module):
    """Deep Ranking's multi-scale network (Wang et al., CVPR 2014).

    The backbone's pooled features next to two shallow convolutional branches that see the
    image sub-sampled 4:1 and 8:1 (coarse shape and intensity layout), each part L2-normalised,
    concatenated; the extractor's head then projects them to the embedding.
    """

    FACTORS = (4, 8)
    BRANCH_CHANNELS = 96
    BRANCH_GRID = 2

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3, self.BRANCH_CHANNELS, kernel_size=8, stride=4, padding=4), nn.ReLU(inplace=True),
                          nn.AdaptiveMaxPool2d(self.BRANCH_GRID))
            for _ in self.FACTORS)
        self.num_features = backbone.num_features + len(self.FACTORS) * self.BRANCH_CHANNELS * self.BRANCH_GRID ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parts = [F.normalize(self.backbone(images), dim=1)]
        for factor, branch in zip(self.FACTORS, self.branches):
            parts.append(F.normalize(branch(F.avg_pool2d(images, factor)).flatten(1), dim=1))
        return torch.cat(parts, dim=1)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of giving it back to the kernel.

    PyTorch on CPU allocates every activation afresh. By default glibc serves large blocks with
    fresh ``mmap`` pages and trims the heap whenever its top is free, so each forward pass
    page-faults its whole working set in again, which cost about half of the CPU time, in the
    kernel (docs/PERFORMANCE.md). This affects the whole process (it keeps the peak heap resident) and
    is the in-process form of the usual advice to preload jemalloc or tcmalloc. Nothing happens
    on other C libraries; calling it again changes nothing.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_MAX, 0)  # large blocks from the heap too, so they are reused
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap between batches


COMPUTE_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _device(device: str | None) -> torch.device:
    """The torch device named (default: cuda if available, else cpu), checked to be present."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        chosen = None
    if chosen is None or chosen.type not in COMPUTE_DEVICES:
        raise CbirError(f"--device {device}: not a device to compute on ({', '.join(COMPUTE_DEVICES)}; "
                        "e.g. cuda:1 for the second GPU)")
    if chosen.type != "cpu":
        backend = getattr(torch, chosen.type)
        present = backend.device_count() if backend.is_available() else 0
        if not present or (chosen.index is not None and chosen.index >= present):
            raise CbirError(f"--device {device}: PyTorch {torch.__version__} sees {present} {chosen.type} "
                            f"device(s) here{', numbered from 0' if present else ''}")
    return chosen
