"""Training metric-learned feature extractors with pytorch-metric-learning.

An extractor (backbone -> linear head to ``num_features`` -> L2) is trained so images of the
same class embed close together: losses, miners and the class-balanced sampler come from
pytorch-metric-learning; validation each epoch is its AccuracyCalculator (precision@1, MAP@R,
FAISS kNN) with the validation images as queries and the training images as references.

Every epoch writes a CSV log line and the curves (PNG); the best and the last extractor are
self-describing safetensors checkpoints (``best.safetensors``, ``last.safetensors``) that
``add_images.py --weights`` takes; ``state.pt`` (tensors only) lets ``--resume`` continue an
interrupted run exactly where the last finished epoch left it.
"""
from __future__ import annotations

import csv
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, samplers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import BaseReducer
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data import ImageItem, check_header, class_folders, load_items, printable, some_labels
from .errors import CbirError, ImageError
from .files import written_whole
from .models import Extractor, create_extractor
from .options import LOSSES, SCHEDULERS

# Losses whose per-element terms belong to one batch sample (its anchor): kNN re-weighting applies.
SAMPLE_ANCHORED = ("margin", "triplet", "contrastive", "ntxent", "normsoftmax", "arcface", "cross_entropy")
# Losses that compare the samples of a batch with each other: a batch of one class has no negatives.
PAIR_LOSSES = ("margin", "triplet", "contrastive", "ntxent")
RUN_FILES = ("best.safetensors", "last.safetensors", "state.pt")  # what a run leaves in its folder
CLASSIFIER_SCALE = 16.0  # logits = scale * cosine(embedding, class weight) for the cross-entropy head


@dataclass
class TrainConfig:
    training_data: str
    out_dir: str
    validation_data: str | None = None  # a folder; for an .npz the val split is used
    val_fraction: float = 0.15  # stratified hold-out when neither gives validation images
    model: str = "densenet121"
    weights: str | None = None  # backbone weights file (e.g. KimiaNet); default ImageNet
    pretrained: bool = True
    input_size: int | None = None
    loss: str = "margin"
    num_features: int = 128
    num_epochs: int = 10
    batch_size: int = 32
    m_per_class: int = 4
    optimizer: str = "adamw"
    lr: float = 1e-4
    lr_proxies: float = 1e-2  # learning rate of proxies / class weights of the loss
    beta_lr: float = 1e-2  # learning rate of the margin loss's beta
    decay: float = 1e-4
    scheduler: str = "cosine"
    step_size: int = 5
    gamma: float = 0.5
    freeze: bool = False  # train the head only (and the multi-scale branches)
    head_init: str = "pca"  # "pca": start from the pretrained features' principal components; "random"
    dr_model: bool = False  # Deep Ranking multi-scale model
    knn_weighting: bool = False  # examples that kNN on the current embedding gets wrong weigh more
    knn_boost: float = 1.0  # their weight is 1 + boost
    generalise: bool = False  # train on a subset of classes; the rest stay unseen
    train_classes: Sequence[str] = ()  # that subset; default a seeded half
    seed: int = 0
    workers: int | None = None
    device: str | None = None
    max_batches: int | None = None  # per epoch, for quick runs
    resume: bool = False
    overwrite: bool = False  # replace a finished or interrupted run in out_dir

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise CbirError(f"unknown --loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        if self.scheduler not in SCHEDULERS:
            raise CbirError(f"unknown --scheduler '{self.scheduler}'; choose one of {', '.join(SCHEDULERS)}")
        if self.knn_weighting and self.loss not in SAMPLE_ANCHORED:
            raise CbirError(f"--knn_weighting needs a loss with per-sample terms ({', '.join(SAMPLE_ANCHORED)})")
        if self.num_epochs < 1:
            raise CbirError(f"--num_epochs must be at least 1, got {self.num_epochs}")
        if self.batch_size < 2:
            raise CbirError(f"--batch_size must be at least 2 (metric losses compare images), got {self.batch_size}")
        if self.loss in PAIR_LOSSES and self.batch_size < 2 * self.m_per_class:
            raise CbirError(f"--batch_size {self.batch_size} holds one class of --m_per_class {self.m_per_class} "
                            f"images, and the {self.loss} loss needs other classes in a batch to learn from: make "
                            f"--batch_size at least {2 * self.m_per_class} or --m_per_class at most "
                            f"{max(1, self.batch_size // 2)}")
        if self.train_classes and not self.generalise:
            raise CbirError("--train_classes applies with --generalise only; add --generalise")
        if len(set(self.train_classes)) == 1:
            raise CbirError(f"--train_classes names one class ({self.train_classes[0]}); training needs at least two")


# ---------------------------------------------------------------------- data
def split_training_data(config: TrainConfig) -> tuple[list[ImageItem], list[ImageItem], list[str]]:
    """(training items, validation items, unseen classes) as the config asks."""
    path = Path(config.training_data)
    train = load_items(path, split="train")
    if path.is_dir():
        empty = sorted({printable(d.name) for d in class_folders(path)} - {item.label for item in train})
        if empty:
            raise CbirError(f"{path}: class folder(s) without images: {', '.join(empty)}")
        check_readable(train)
    if config.validation_data:
        validation = load_items(config.validation_data, split="val")
    elif path.suffix == ".npz":
        validation = load_items(path, split="val")
    else:
        train, validation = stratified_split(train, config.val_fraction, config.seed)
    classes = sorted({item.label for item in train})
    unseen: list[str] = []
    if config.generalise:
        chosen = list(config.train_classes) or sorted(random.Random(config.seed).sample(classes, max(2, len(classes) // 2)))
        missing = set(chosen) - set(classes)
        if missing:
            raise CbirError(f"--train_classes: no training images of class {', '.join(sorted(missing))}")
        unseen = [c for c in classes if c not in chosen]
        train = [item for item in train if item.label in chosen]
        validation = [item for item in validation if item.label in chosen]
    counts = {c: sum(item.label == c for item in train) for c in {item.label for item in train}}
    if len(counts) < 2:
        raise CbirError(f"{config.training_data}: training needs at least two classes, found {sorted(counts)}")
    if not validation:
        advice = "give --validation_data"
        if path.is_dir() and not config.validation_data:
            largest = max(counts.values())
            if config.val_fraction == 0:
                advice += " or a --val_fraction above 0"
            elif largest > 2:  # stratified_split takes validation images only from classes of 3 or more
                advice += (f" or a larger --val_fraction ({config.val_fraction:g} of the largest class, "
                           f"{largest} images, rounds to none)")
            else:
                advice += " (classes of 2 images or fewer give none to validation)"
        raise CbirError(f"{config.training_data}: no validation images; {advice}")
    shared = {item.label for item in validation} & set(counts)
    if not shared:  # every validation image would count as a miss: the best epoch would be chance
        raise CbirError(f"{config.validation_data}: no validation class is a training class (validation: "
                        f"{some_labels(item.label for item in validation)}; training: {some_labels(counts)})")
    return train, validation, unseen


def check_readable(items: Sequence[ImageItem]) -> None:
    """Read every image file's header; one error naming the unreadable files, before any training."""
    bad = []
    for item in items:
        try:
            check_header(item.location)
        except ImageError as exc:
            bad.append(str(exc))
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CbirError(f"{len(bad)} training image(s) cannot be read: {'; '.join(bad[:5])}{more}")


def stratified_split(items: Sequence[ImageItem], fraction: float, seed: int) -> tuple[list, list]:
    rng = random.Random(seed)
    train, held_out = [], []
    for label in sorted({item.label for item in items}):
        members = [item for item in items if item.label == label]
        rng.shuffle(members)
        cut = int(round(fraction * len(members))) if len(members) > 2 else 0
        held_out += members[:cut]
        train += members[cut:]
    return train, held_out


class Augment:
    """Training augmentations for medical images: crops, flips, small rotations, mild colour jitter."""

    def __init__(self, input_size: int):
        from torchvision.transforms import v2

        self.transform = v2.Compose([
            v2.RandomResizedCrop(input_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05, hue=0.02),  # stain variation
            v2.PILToTensor(),
        ])

    def __call__(self, image):
        return self.transform(image)


class LabelledImages(Dataset):
    def __init__(self, items: Sequence[ImageItem], class_index: dict[str, int], transform):
        self.items, self.class_index, self.transform = list(items), class_index, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        item = self.items[position]
        try:
            image, _ = item.read()
        except ImageError as exc:
            raise CbirError(f"training image unreadable: {exc}") from exc
        return self.transform(image), self.class_index[item.label], position


# ---------------------------------------------------------------------- loss
class AnchorWeightedReducer(BaseReducer):
    """Mean of the non-zero loss terms, each weighted by the weight of its anchor sample."""

    weights: torch.Tensor | None = None  # one per batch sample; None: all equal

    def _weighted(self, losses, anchors):
        weights = torch.ones_like(losses) if self.weights is None else self.weights[anchors].to(losses)
        positive = losses > 0
        if not positive.any():
            return losses.sum() * 0
        return (losses * weights)[positive].sum() / weights[positive].sum()

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        return self._weighted(losses, loss_indices)

    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels):
        return self._weighted(losses, loss_indices[0])

    neg_pair_reduction = pos_pair_reduction

    def triplet_reduction(self, losses, loss_indices, embeddings, labels):
        return self._weighted(losses, loss_indices[0])


class CosineCrossEntropy(BaseMetricLossFunction):
    """Plain cross-entropy through a cosine classifier head: the classification baseline."""

    def __init__(self, num_classes: int, embedding_size: int, **kwargs):
        super().__init__(**kwargs)
        self.W = nn.Parameter(torch.randn(num_classes, embedding_size) / math.sqrt(embedding_size))

    def compute_loss(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        logits = CLASSIFIER_SCALE * F.normalize(embeddings, dim=1) @ F.normalize(self.W, dim=1).T
        terms = F.cross_entropy(logits, labels, reduction="none")
        return {"loss": {"losses": terms, "indices": torch.arange(len(labels), device=labels.device),
                         "reduction_type": "element"}}


def build_loss(name: str, num_classes: int, dim: int, weighted: bool):
    """(loss, miner or None) from pytorch-metric-learning; the loss may hold learned parameters."""
    extra = {"reducer": AnchorWeightedReducer()} if weighted else {}
    if name == "margin":
        return (losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, learn_beta=True, num_classes=num_classes, **extra),
                miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))
    if name == "proxy_nca":
        return losses.ProxyNCALoss(num_classes, dim, softmax_scale=8, **extra), None
    if name == "proxy_anchor":
        return losses.ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32), None
    if name == "softtriple":
        return losses.SoftTripleLoss(num_classes, dim, centers_per_class=4), None
    if name == "normsoftmax":
        return losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=0.05, **extra), None
    if name == "arcface":
        return losses.ArcFaceLoss(num_classes, dim, margin=28.6, scale=64, **extra), None
    if name == "triplet":
        return losses.TripletMarginLoss(margin=0.1, **extra), miners.TripletMarginMiner(margin=0.2,
                                                                                        type_of_triplets="semihard")
    if name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, **extra), None
    if name == "ntxent":
        return losses.NTXentLoss(temperature=0.07, **extra), None
    return CosineCrossEntropy(num_classes, dim, **extra), None


def class_weights(loss) -> tuple[torch.Tensor, float] | None:
    """(classes x dim weights, logit scale) of a loss that learns one vector per class, else None."""
    if isinstance(loss, (losses.ArcFaceLoss, losses.NormalizedSoftmaxLoss)):
        scale = loss.scale if isinstance(loss, losses.ArcFaceLoss) else 1 / loss.temperature
        return loss.W.detach().T.contiguous(), float(scale)
    if isinstance(loss, (losses.ProxyAnchorLoss, losses.ProxyNCALoss)):
        return loss.proxies.detach().clone(), 16.0
    if isinstance(loss, CosineCrossEntropy):
        return loss.W.detach().clone(), CLASSIFIER_SCALE
    return None


def _set_weights(loss, weights: torch.Tensor | None) -> None:
    for module in loss.modules():
        if isinstance(module, AnchorWeightedReducer):
            module.weights = weights


# -------------------------------------------------------------------- report
@dataclass
class TrainReport:
    best: Path
    last: Path
    log: Path
    curves: Path
    best_epoch: int
    best_metrics: dict
    epoch_seconds: list[float] = field(default_factory=list)
    unseen_classes: list[str] = field(default_factory=list)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _embed(extractor: Extractor, loader: DataLoader, backbone_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, or the backbone's features when ``backbone_only``; labels) of a loader, in order."""
    extractor.eval()
    outputs, labels = [], []
    with torch.inference_mode():
        for images, classes, _ in loader:
            images = images.to(extractor.device).contiguous(memory_format=torch.channels_last)
            output = extractor.backbone(extractor.normalise(images)) if backbone_only else extractor(images)
            outputs.append(output.float().cpu())
            labels.append(classes)
    return torch.cat(outputs), torch.cat(labels)


def knn_wrong(vectors: torch.Tensor, labels: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Whether leave-one-out kNN (majority of k) on these vectors misclassifies each one."""
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.topk(min(k, len(vectors) - 1), dim=1).indices
    votes = F.one_hot(labels[neighbours], int(labels.max()) + 1).sum(dim=1)
    return votes.argmax(dim=1) != labels


def _make_optimizer(config: TrainConfig, extractor: Extractor, loss) -> torch.optim.Optimizer:
    model_parameters = [p for p in extractor.parameters() if p.requires_grad]
    groups = [{"params": model_parameters, "lr": config.lr}]
    loss_parameters = list(loss.parameters())
    if loss_parameters:
        beta_only = config.loss == "margin"
        groups.append({"params": loss_parameters, "lr": config.beta_lr if beta_only else config.lr_proxies,
                       "weight_decay": 0.0})
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, weight_decay=config.decay)


def learning_rate_factor(config: TrainConfig, epoch: int) -> float:
    """The share of the configured learning rates that ``epoch`` (1-based) trains with.

    A function of the epoch and the flags alone, the closed forms of torch's CosineAnnealingLR,
    StepLR and ExponentialLR: a resumed run follows the schedule of the --num_epochs it is given.
    A restored torch scheduler kept the first run's length, so a run of 3 epochs resumed for 5
    trained epoch 4 at a learning rate of 0 and epoch 5 at a rising one.
    """
    done = epoch - 1
    if config.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done / config.num_epochs))
    if config.scheduler == "step":
        return config.gamma ** (done // config.step_size)
    if config.scheduler == "exponential":
        return config.gamma ** done
    return 1.0


def train_extractor(config: TrainConfig, progress: bool = True) -> TrainReport:
    """Train, validate every epoch, keep the best and last checkpoints; see the module docstring."""
    from . import plots

    config.check()
    _seed_everything(config.seed)
    out = Path(config.out_dir)
    previous = [name for name in RUN_FILES if (out / name).exists()]
    if previous and not (config.resume or config.overwrite):
        # A database built with best.safetensors finds it by path: replacing it silently would
        # leave that database unable to rebuild its extractor.
        raise CbirError(f"{out} holds a training run ({', '.join(previous)}): --load resumes it, --overwrite "
                        "replaces it, or give another --weights folder")
    out.mkdir(parents=True, exist_ok=True)
    train_items, validation_items, unseen = split_training_data(config)
    class_names = sorted({item.label for item in train_items})
    class_index = {name: i for i, name in enumerate(class_names)}
    extractor = create_extractor(config.model, weights=config.weights, input_size=config.input_size,
                                 pretrained=config.pretrained, embedding_dim=config.num_features, device=config.device,
                                 multiscale=config.dr_model)
    if extractor.head is None:
        raise CbirError(f"--num_features {config.num_features} equals the backbone's feature size; "
                        "choose another size so there is an embedding head to train")
    extractor = extractor.to(memory_format=torch.channels_last)
    pretrained_part = extractor.backbone.backbone if config.dr_model else extractor.backbone
    if config.freeze:
        for parameter in pretrained_part.parameters():
            parameter.requires_grad_(False)
    input_size = extractor.spec.input_size
    labels = [class_index[item.label] for item in train_items]
    loss, miner = build_loss(config.loss, len(class_names), config.num_features, config.knn_weighting)
    loss = loss.to(extractor.device)
    optimizer = _make_optimizer(config, extractor, loss)
    configured_rates = [group["lr"] for group in optimizer.param_groups]
    workers = min(4, torch.get_num_threads()) if config.workers is None else config.workers
    # MPerClassSampler fills a batch with m images of each of batch/m classes: with few classes
    # m grows so the batch still holds batch_size images.
    classes_per_batch = max(1, min(len(class_names), config.batch_size // config.m_per_class))
    m_per_class = config.batch_size // classes_per_batch
    batch_size = m_per_class * classes_per_batch
    sampler = samplers.MPerClassSampler(labels, m_per_class, batch_size=batch_size,
                                        length_before_new_iter=len(labels))
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(LabelledImages(train_items, class_index, Augment(input_size)), batch_size=batch_size,
                              sampler=sampler, num_workers=workers, drop_last=True, generator=generator,
                              persistent_workers=workers > 0)
    plain = extractor.preprocess
    reference_loader = DataLoader(LabelledImages(train_items, class_index, plain), batch_size=64, num_workers=workers)
    validation_index = {**class_index, **{c: -1 for c in {i.label for i in validation_items} - set(class_index)}}
    validation_loader = DataLoader(LabelledImages(validation_items, validation_index, plain), batch_size=64,
                                   num_workers=workers)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                    device=torch.device("cpu"))
    log_path, state_path = out / "log.csv", out / "state.pt"
    start_epoch, best_score, best_epoch, best_metrics, weights = 1, -1.0, 0, {}, None
    shape = _run_shape(config, extractor, class_names)
    if config.resume and state_path.exists():
        state = _resumed_state(state_path, shape, extractor, loss, optimizer)
        start_epoch, best_score, best_epoch = int(state["epoch"]) + 1, float(state["best_score"]), int(state["best_epoch"])
        weights = state.get("knn_weights")
        _keep_log_rows(log_path, int(state["epoch"]))
    else:
        if config.resume:
            warnings.warn(f"--load: {state_path} does not exist, so training starts afresh")
        log_path.unlink(missing_ok=True)
    training_notes = {k: v for k, v in asdict(config).items()
                      if k not in ("out_dir", "workers", "device", "resume", "overwrite")}
    report = TrainReport(best=out / "best.safetensors", last=out / "last.safetensors", log=log_path,
                         curves=out / "curves.png", best_epoch=best_epoch, best_metrics=best_metrics,
                         unseen_classes=unseen)

    def validate(epoch: int, mean_loss: float, learning_rate: float, started: float) -> torch.Tensor | None:
        """Validation metrics, log line, checkpoints and resumable state after ``epoch``."""
        nonlocal best_score, best_epoch, best_metrics
        reference, reference_labels = _embed(extractor, reference_loader)
        queries, query_labels = _embed(extractor, validation_loader)
        seen = query_labels >= 0
        metrics = calculator.get_accuracy(queries[seen], query_labels[seen], reference, reference_labels,
                                          ref_includes_query=False)
        knn_weights = None
        if config.knn_weighting:
            knn_weights = 1.0 + config.knn_boost * knn_wrong(reference, reference_labels).float()
            metrics["knn_wrong_share"] = float((knn_weights > 1).float().mean())
        seconds = time.perf_counter() - started
        if epoch:
            report.epoch_seconds.append(seconds)
        row = {"epoch": epoch, "loss": mean_loss, **{k: float(v) for k, v in metrics.items()},
               "lr": learning_rate, "seconds": round(seconds, 2)}
        _append_log(log_path, row)
        spec = replace(extractor.spec, class_names=tuple(class_names), training={**training_notes, "epoch": epoch})
        trained = _export(extractor, spec, class_weights(loss))
        trained.save(report.last)
        # precision@1 on a small validation set ties often; MAP@R breaks the ties.
        score = float(metrics["precision_at_1"]) + 1e-6 * float(metrics["mean_average_precision_at_r"])
        if score > best_score:
            best_score, best_epoch, best_metrics = score, epoch, row
            trained.save(report.best)
        with written_whole(state_path) as partial:
            torch.save({"extractor": extractor.state_dict(), "loss": loss.state_dict(),
                        "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "shape": shape, "epoch": epoch,
                        "best_score": best_score, "best_epoch": best_epoch,
                        **({"knn_weights": knn_weights} if knn_weights is not None else {})}, partial)
        plots.training_curves(log_path, report.curves)
        return knn_weights

    if start_epoch == 1:
        started = time.perf_counter()
        if config.head_init == "pca":
            initialise_from_data(extractor, loss, reference_loader)
        weights = validate(0, float("nan"), configured_rates[0], started)  # the starting point
    for epoch in range(start_epoch, config.num_epochs + 1):
        started = time.perf_counter()
        factor = learning_rate_factor(config, epoch)
        for group, rate in zip(optimizer.param_groups, configured_rates):
            group["lr"] = rate * factor
        extractor.train()
        if config.freeze:
            pretrained_part.eval()  # frozen batch-norm statistics too
        _set_weights(loss, weights)
        total, batches = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.num_epochs}", unit="batch", disable=not progress,
                   total=min(len(train_loader), config.max_batches or len(train_loader)))
        for images, classes, positions in bar:
            images = images.to(extractor.device).contiguous(memory_format=torch.channels_last)
            classes = classes.to(extractor.device)
            embeddings = extractor(images)
            if weights is not None:
                _set_weights(loss, weights[positions].to(extractor.device))
            pairs = miner(embeddings, classes) if miner is not None else None
            value = loss(embeddings, classes, pairs)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total, batches = total + value.detach().item(), batches + 1
            bar.set_postfix(loss=f"{total / batches:.4f}")
            if config.max_batches and batches >= config.max_batches:
                break
        bar.close()
        weights = validate(epoch, total / max(batches, 1), optimizer.param_groups[0]["lr"], started)
    report.best_epoch, report.best_metrics = best_epoch, best_metrics or _best_row(log_path)
    return report


def _run_shape(config: TrainConfig, extractor: Extractor, class_names: list[str]) -> dict:
    """The settings that shape a run's saved state: a resumed run must be given the same."""
    return {"--model": config.model, "--input_size": extractor.spec.input_size, "--num_features": config.num_features,
            "--loss": config.loss, "--optimizer": config.optimizer, "--freeze": config.freeze,
            "--dr_model": config.dr_model, "classes": class_names}


def _resumed_state(path: Path, shape: dict, extractor: Extractor, loss, optimizer) -> dict:
    """Load ``path`` into the extractor, loss, optimizer and random generator; its other entries."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file raises whatever torch's unpickler meets first
        raise CbirError(f"cannot resume {path}: not a readable training state ({type(exc).__name__}); "
                        "start afresh without --load") from exc
    saved = state.get("shape", shape)  # states of earlier versions carry none
    changed = [f"{key} {_shown(saved.get(key))} -> {_shown(value)}" for key, value in shape.items() if saved.get(key) != value]
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


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ", ".join(value) if isinstance(value, list) else str(value)


def _keep_log_rows(path: Path, last_epoch: int) -> None:
    """Drop the log's rows after ``last_epoch``: a run stopped between its log line and its state
    repeats that epoch when resumed."""
    if not path.exists():
        return
    rows = _log_rows(path)
    kept = [row for row in rows if int(row["epoch"]) <= last_epoch]
    if len(kept) < len(rows):
        with written_whole(path) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)


def initialise_from_data(extractor: Extractor, loss, loader: DataLoader) -> None:
    """Start from the pretrained geometry: the head projects onto the training features' principal
    components (so epoch 0 is about as good as kNN on the frozen features), and class weights or
    proxies of the loss start at the class means of those first embeddings."""
    features, labels = _embed(extractor, loader, backbone_only=True)
    mean = features.mean(dim=0)
    _, _, components = torch.linalg.svd(features - mean, full_matrices=False)
    size = extractor.head.out_features
    weight = torch.randn(size, features.shape[1]) * 1e-3
    weight[: min(size, len(components))] = components[:size]
    with torch.no_grad():
        extractor.head.weight.copy_(weight)
        extractor.head.bias.copy_(-(weight @ mean))
        embeddings = F.normalize(extractor.head(features.to(extractor.device)).cpu(), dim=1)
        means = torch.stack([F.normalize(embeddings[labels == c].mean(dim=0), dim=0)
                             for c in range(int(labels.max()) + 1)])
        if isinstance(loss, (losses.ArcFaceLoss, losses.NormalizedSoftmaxLoss)):
            loss.W.copy_(means.T)
        elif isinstance(loss, (losses.ProxyAnchorLoss, losses.ProxyNCALoss)):
            loss.proxies.copy_(means)
        elif isinstance(loss, CosineCrossEntropy):
            loss.W.copy_(means)


def _export(extractor: Extractor, spec, weights: tuple[torch.Tensor, float] | None) -> Extractor:
    """A copy of the extractor for saving: the spec with class names, and the loss's class weights."""
    trained = Extractor(spec, extractor.backbone, extractor.head)
    if weights is not None:
        trained.set_classifier(weights[0].cpu(), weights[1])
    return trained


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _log_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _best_row(path: Path) -> dict:
    rows = _log_rows(path)
    return max(rows, key=lambda r: (float(r["precision_at_1"]), float(r["mean_average_precision_at_r"]))) if rows else {}
