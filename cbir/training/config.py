"""What a training run is asked to do (TrainConfig, checked up front) and the images it trains and validates on."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cbir.errors import CbirError, ImageError
from cbir.images.decode import check_header
from cbir.images.sources import ImageItem, class_folders, load_items, printable, some_labels
from cbir.options import LOSSES, SCHEDULERS

# Losses whose per-element terms belong to one batch sample (its anchor): kNN re-weighting applies.
SAMPLE_ANCHORED = ("margin", "triplet", "contrastive", "ntxent", "normsoftmax", "arcface", "cross_entropy")


# Losses that compare the samples of a batch with each other: a batch of one class has no negatives.
PAIR_LOSSES = ("margin", "triplet", "contrastive", "ntxent")


DEFAULT_TRAIN_BLOCKS = 4  # chosen on BreastMNIST's and RetinaMNIST's validation splits (docs/QUALITY.md)

RUN_FILES = ("best.safetensors", "last.safetensors", "state.pt")  # what a run leaves in its folder


@dataclass
class TrainConfig:
    training_data: str
    out_dir: str
    validation_data: str | None = None  # a folder; for an .npz the val split is used
    val_fraction: float = 0.15  # stratified hold-out when neither gives validation images
    model: str = "efficientnet_lite0"
    weights: str | None = None  # backbone weights file (e.g. KimiaNet); default ImageNet
    pretrained: bool = True
    input_size: int | None = None
    loss: str = "cross_entropy"
    num_features: int = 128
    num_epochs: int = 20
    batch_size: int = 32
    m_per_class: int = 4
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_proxies: float = 1e-2  # learning rate of proxies / class weights of the loss
    beta_lr: float = 1e-2  # learning rate of the margin loss's beta
    decay: float = 1e-4
    scheduler: str = "cosine"
    step_size: int = 5
    gamma: float = 0.5
    freeze: bool = False  # train the head only (and the multi-scale branches)
    # The last stages of the backbone trained (with the head) from cached activations of the frozen
    # first ones (cbir.training.cached); 0: the whole network from images. Default: 4 for backbones
    # built as EfficientNets, else the whole network.
    train_blocks: int | None = None
    views: int = 4  # cached views of each training image: the plain one and views - 1 augmented ones
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
            raise CbirError(f"--knn-weighting needs a loss with per-sample terms ({', '.join(SAMPLE_ANCHORED)})")
        if self.num_epochs < 1:
            raise CbirError(f"--num-epochs must be at least 1, got {self.num_epochs}")
        if self.batch_size < 2:
            raise CbirError(f"--batch-size must be at least 2 (metric losses compare images), got {self.batch_size}")
        if self.loss in PAIR_LOSSES and self.batch_size < 2 * self.m_per_class:
            raise CbirError(f"--batch-size {self.batch_size} holds one class of --m-per-class {self.m_per_class} "
                            f"images, and the {self.loss} loss needs other classes in a batch to learn from: make "
                            f"--batch-size at least {2 * self.m_per_class} or --m-per-class at most "
                            f"{max(1, self.batch_size // 2)}")
        if self.train_blocks and (self.freeze or self.dr_model):
            raise CbirError(f"--train-blocks {self.train_blocks} trains backbone stages, which "
                            f"{'--freeze' if self.freeze else '--dr-model'} does not: leave one of them out")
        if self.views < 1:
            raise CbirError(f"--views must be at least 1 (the plain image), got {self.views}")
        if self.train_classes and not self.generalise:
            raise CbirError("--train-classes applies with --generalise only; add --generalise")
        if len(set(self.train_classes)) == 1:
            raise CbirError(f"--train-classes names one class ({self.train_classes[0]}); training needs at least two")

    def blocks_to_train(self, stages: int | None) -> int:
        """Backbone stages to train from cached activations (0: the whole network from images), for a
        backbone of ``stages`` stages (None: one that cannot be split)."""
        if self.train_blocks is not None:
            return self.train_blocks
        return DEFAULT_TRAIN_BLOCKS if stages and not (self.freeze or self.dr_model) else 0


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
            raise CbirError(f"--train-classes: no training images of class {', '.join(sorted(missing))}")
        unseen = [c for c in classes if c not in chosen]
        train = [item for item in train if item.label in chosen]
        validation = [item for item in validation if item.label in chosen]
    counts = {c: sum(item.label == c for item in train) for c in {item.label for item in train}}
    if len(counts) < 2:
        raise CbirError(f"{config.training_data}: training needs at least two classes, found {sorted(counts)}")
    if not validation:
        advice = "give --validation-data"
        if path.is_dir() and not config.validation_data:
            largest = max(counts.values())
            if config.val_fraction == 0:
                advice += " or a --val-fraction above 0"
            elif largest > 2:  # stratified_split takes validation images only from classes of 3 or more
                advice += (f" or a larger --val-fraction ({config.val_fraction:g} of the largest class, "
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

