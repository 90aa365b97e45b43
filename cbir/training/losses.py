"""Metric-learning losses (pytorch-metric-learning) and the kNN-guided weighting of their terms."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import BaseReducer
from torch import nn

CLASSIFIER_SCALE = 16.0  # logits = scale * cosine(embedding, class weight) for the cross-entropy head


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


def set_class_weights(loss, weights: torch.Tensor | None) -> None:
    for module in loss.modules():
        if isinstance(module, AnchorWeightedReducer):
            module.weights = weights


def knn_wrong(vectors: torch.Tensor, labels: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Whether leave-one-out kNN (majority of k) on these vectors misclassifies each one."""
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.topk(min(k, len(vectors) - 1), dim=1).indices
    votes = F.one_hot(labels[neighbours], int(labels.max()) + 1).sum(dim=1)
    return votes.argmax(dim=1) != labels

