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

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, samplers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from torch.utils.data import DataLoader
from tqdm import tqdm

from cbir.errors import CbirError
from cbir.files import written_whole
from cbir.models.extractor import Extractor
from cbir.models.factory import create_extractor
from cbir.training.cached import SplitBackbone, cached_loaders, stage_count
from cbir.training.config import RUN_FILES, TrainConfig, split_training_data
from cbir.training.data import Augment, LabelledImages
from cbir.training.losses import CosineCrossEntropy, build_loss, class_weights, knn_wrong, set_class_weights
from cbir.training.runlog import append_log, best_row, keep_log_rows, resumed_state, run_shape


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


def _embed(forward, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(``forward`` of every input of a loader: embeddings or features; labels), in order."""
    outputs, labels = [], []
    with torch.inference_mode():
        for inputs, classes, _ in loader:
            outputs.append(forward(inputs.to(device).contiguous(memory_format=torch.channels_last)).float().cpu())
            labels.append(classes)
    return torch.cat(outputs), torch.cat(labels)


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
    StepLR and ExponentialLR: a resumed run follows the schedule of the --num-epochs it is given.
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
    from cbir.viz import plots

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
        raise CbirError(f"--num-features {config.num_features} equals the backbone's feature size; "
                        "choose another size so there is an embedding head to train")
    extractor = extractor.to(memory_format=torch.channels_last)
    pretrained_part = extractor.backbone.backbone if config.dr_model else extractor.backbone
    if config.freeze:
        for parameter in pretrained_part.parameters():
            parameter.requires_grad_(False)
    blocks = config.blocks_to_train(stage_count(extractor.backbone))
    split = SplitBackbone(extractor, blocks) if blocks else None  # freezes the trunk: before the optimizer
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
    plain = extractor.preprocess
    reference_loader = DataLoader(LabelledImages(train_items, class_index, plain), batch_size=64, num_workers=workers)
    validation_index = {**class_index, **{c: -1 for c in {i.label for i in validation_items} - set(class_index)}}
    validation_loader = DataLoader(LabelledImages(validation_items, validation_index, plain), batch_size=64,
                                   num_workers=workers)
    augmented = LabelledImages(train_items, class_index, Augment(input_size))
    if split is None:
        train_loader = DataLoader(augmented, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                  drop_last=True, generator=generator, persistent_workers=workers > 0)
        forward = extractor
        features = lambda images: extractor.backbone(extractor.normalise(images))  # noqa: E731
    else:
        train_loader, reference_loader, validation_loader = cached_loaders(
            split, augmented, reference_loader, validation_loader, config.views, batch_size, sampler, workers, progress)
        forward, features = split, split.features
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                    device=torch.device("cpu"))
    log_path, state_path = out / "log.csv", out / "state.pt"
    start_epoch, best_score, best_epoch, best_metrics, weights = 1, -1.0, 0, {}, None
    shape = run_shape(config, extractor, class_names)
    if config.resume and state_path.exists():
        state = resumed_state(state_path, shape, extractor, loss, optimizer)
        start_epoch, best_score, best_epoch = int(state["epoch"]) + 1, float(state["best_score"]), int(state["best_epoch"])
        weights = state.get("knn_weights")
        keep_log_rows(log_path, int(state["epoch"]))
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
        extractor.eval()
        reference, reference_labels = _embed(forward, reference_loader, extractor.device)
        queries, query_labels = _embed(forward, validation_loader, extractor.device)
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
        append_log(log_path, row)
        spec = replace(extractor.spec, class_names=tuple(class_names), training={**training_notes, "epoch": epoch})
        trained = _export(extractor, spec, class_weights(loss))
        trained.save(report.last)
        # precision@1 on a small validation set ties often; MAP@R breaks the ties.
        score = float(metrics["precision_at_1"]) + 1e-6 * float(metrics["mean_average_precision_at_r"])
        better = score > best_score
        if better:
            best_score, best_epoch, best_metrics = score, epoch, row
            trained.save(report.best)
        if progress:
            tqdm.write(f"epoch {epoch}: {seconds:.1f} s, validation precision@1 {row['precision_at_1']:.3f}, MAP@R "
                       f"{row['mean_average_precision_at_r']:.3f}{' (best so far)' if better else ''}")
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
            initialise_from_data(extractor, loss, features, reference_loader)
        weights = validate(0, float("nan"), configured_rates[0], started)  # the starting point
    for epoch in range(start_epoch, config.num_epochs + 1):
        started = time.perf_counter()
        factor = learning_rate_factor(config, epoch)
        for group, rate in zip(optimizer.param_groups, configured_rates):
            group["lr"] = rate * factor
        extractor.train()
        if config.freeze:
            pretrained_part.eval()  # frozen batch-norm statistics too
        set_class_weights(loss, weights)
        total, batches = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.num_epochs}", unit="batch", disable=not progress,
                   total=min(len(train_loader), config.max_batches or len(train_loader)))
        for images, classes, positions in bar:
            images = images.to(extractor.device).contiguous(memory_format=torch.channels_last)
            classes = classes.to(extractor.device)
            embeddings = forward(images)
            if weights is not None:
                set_class_weights(loss, weights[positions].to(extractor.device))
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
    report.best_epoch, report.best_metrics = best_epoch, best_metrics or best_row(log_path)
    return report


def initialise_from_data(extractor: Extractor, loss, features_of, loader: DataLoader) -> None:
    """Start from the pretrained geometry: the head projects onto the training features' principal
    components (so epoch 0 is about as good as kNN on the frozen features), and class weights or
    proxies of the loss start at the class means of those first embeddings."""
    extractor.eval()
    features, labels = _embed(features_of, loader, extractor.device)
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


