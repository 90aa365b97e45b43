"""Training extractors: losses learn their own parameters, runs resume, checkpoints serve indexing."""
from __future__ import annotations

import csv
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cbir.errors import CbirError
from cbir.models.checkpoint import load_checkpoint
from cbir.options import LOSSES
from cbir.training.config import TrainConfig, split_training_data
from cbir.training.loop import _make_optimizer, learning_rate_factor, train_extractor
from cbir.training.losses import build_loss, class_weights, knn_wrong, set_class_weights

from .conftest import BREASTMNIST, SHARED_DATA

PARAMETRIC = ("margin", "proxy_nca", "proxy_anchor", "softtriple", "normsoftmax", "arcface", "cross_entropy")


def batch(classes=4, per_class=4, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, dim, generator=generator)
    inputs = centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator)
    return inputs, labels


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_trains_and_learns_its_own_parameters(name):
    torch.manual_seed(0)
    inputs, labels = batch()
    model = nn.Linear(16, 8)
    loss, miner = build_loss(name, num_classes=4, dim=8, weighted=False)
    config = TrainConfig(training_data="", out_dir="", loss=name, lr=1e-3, lr_proxies=1e-1, beta_lr=1e-1)
    optimizer = _make_optimizer(config, model, loss)
    before = [p.detach().clone() for p in loss.parameters()]
    embeddings = nn.functional.normalize(model(inputs), dim=1)
    value = loss(embeddings, labels, miner(embeddings, labels) if miner else None)
    assert torch.isfinite(value) and value.item() > 0
    optimizer.zero_grad()
    value.backward()
    optimizer.step()
    if name in PARAMETRIC:
        assert before, f"{name} should learn proxies / class weights / beta"
        assert any(not torch.equal(b, p) for b, p in zip(before, loss.parameters())), f"{name}: parameters unchanged"
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1)
    else:
        assert not before


def test_anchor_weights_change_the_loss_and_uniform_weights_do_not():
    inputs, labels = batch(seed=1)
    embeddings = nn.functional.normalize(inputs[:, :8], dim=1)
    plain, _ = build_loss("triplet", 4, 8, weighted=False)
    weighted, _ = build_loss("triplet", 4, 8, weighted=True)
    set_class_weights(weighted, torch.ones(len(labels)))
    assert weighted(embeddings, labels).item() == pytest.approx(plain(embeddings, labels).item(), rel=1e-5)
    set_class_weights(weighted, torch.linspace(1, 10, len(labels)))
    assert weighted(embeddings, labels).item() != pytest.approx(plain(embeddings, labels).item(), rel=1e-3)


def test_knn_wrong_by_hand():
    vectors = nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [1, 0.15]]), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # the last one sits among class 0: its 3 nearest are class 0, so kNN gets it wrong
    assert knn_wrong(vectors, labels, k=3).tolist() == [False, False, False, False, False, True]


def test_classifier_weights_come_from_the_loss():
    arcface, _ = build_loss("arcface", 3, 8, weighted=False)
    weights, scale = class_weights(arcface)
    assert weights.shape == (3, 8) and scale == 64
    assert class_weights(build_loss("triplet", 3, 8, weighted=False)[0]) is None


@pytest.mark.filterwarnings("ignore:.*no files in the class folder")  # training refuses it, below
def test_bad_training_data_is_refused(tmp_path):
    folder = tmp_path / "data"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
    source = next((SHARED_DATA / "busi" / "benign").iterdir())
    shutil.copy(source, folder / "a" / "x.png")
    with pytest.raises(CbirError, match="without images: b"):
        split_training_data(TrainConfig(training_data=str(folder), out_dir=""))
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9")  # a class named in Latin-1 is not empty
    os.mkdir(latin1)
    shutil.copy(source, os.path.join(latin1, b"z.png"))
    with pytest.raises(CbirError, match="without images: b$"):
        split_training_data(TrainConfig(training_data=str(folder), out_dir=""))
    shutil.rmtree(latin1)
    shutil.copy(source, folder / "b" / "y.png")
    (folder / "b" / "broken.png").write_bytes(source.read_bytes()[:100])
    with pytest.raises(CbirError, match="1 training image.*broken.png"):
        split_training_data(TrainConfig(training_data=str(folder), out_dir=""))
    (folder / "b").rename(tmp_path / "gone")
    with pytest.raises(CbirError, match="at least two classes"):
        split_training_data(TrainConfig(training_data=str(folder), out_dir=""))
    with pytest.raises(CbirError, match="unknown --loss"):
        TrainConfig(training_data="", out_dir="", loss="magic").check()


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_replaced(tmp_path):
    """A second run into the same --weights silently replaced the checkpoints a database was built with."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"a database's checkpoint")
    with pytest.raises(CbirError, match=rf"^{run} holds a training run \(best.safetensors\): --load resumes it, "
                                        r"--overwrite replaces it, or give another --weights folder$"):
        train_extractor(quick_config(run), progress=False)
    assert (run / "best.safetensors").read_bytes() == b"a database's checkpoint"
    report = train_extractor(quick_config(run, num_epochs=1, overwrite=True), progress=False)
    assert load_checkpoint(report.best).spec.architecture == "efficientnet_lite0"


@pytest.mark.parametrize("changes,message", [
    # MPerClassSampler would fill each batch with one class: a pair loss then has no negatives.
    ({"batch_size": 8, "m_per_class": 100, "loss": "margin"}, "--batch-size 8 holds one class of --m-per-class 100 images, and the "
                                            "margin loss needs other classes in a batch to learn from: make "
                                            "--batch-size at least 200 or --m-per-class at most 4"),
    ({"batch_size": 3, "loss": "triplet"}, "--batch-size 3 holds one class of --m-per-class 4 images"),
    ({"train_classes": ["a", "b"]}, "--train-classes applies with --generalise only; add --generalise"),
    ({"train_classes": ["a"], "generalise": True}, r"--train-classes names one class \(a\); training needs at least two"),
])
def test_settings_that_would_train_nothing_are_refused(changes, message):
    with pytest.raises(CbirError, match=f"^{message}"):
        TrainConfig(training_data="", out_dir="", **changes).check()
    TrainConfig(training_data="", out_dir="", batch_size=3, loss="arcface").check()  # proxies are the negatives


def test_no_validation_images_says_which_flag_would_give_some(tmp_path):
    """The advice was '--val-fraction' even where that flag could not help."""
    source = next((SHARED_DATA / "busi" / "benign").iterdir())
    for label, count in (("a", 5), ("b", 2)):
        (tmp_path / label).mkdir()
        for index in range(count):
            shutil.copy(source, tmp_path / label / f"{index}.png")
    for fraction, advice in [
        (0.0, "give --validation-data or a --val-fraction above 0"),
        (0.05, "give --validation-data or a larger --val-fraction (0.05 of the largest class, 5 images, rounds "
               "to none)"),
    ]:
        with pytest.raises(CbirError, match=rf"^{tmp_path}: no validation images; {re.escape(advice)}$"):
            split_training_data(TrainConfig(training_data=str(tmp_path), out_dir="", val_fraction=fraction))
    for index in range(2, 5):
        (tmp_path / "a" / f"{index}.png").unlink()
    with pytest.raises(CbirError, match=r"give --validation-data \(classes of 2 images or fewer give none"):
        split_training_data(TrainConfig(training_data=str(tmp_path), out_dir="", val_fraction=0.5))


def test_validation_data_without_a_training_class_is_refused():
    """RetinaMNIST's grades cannot validate BreastMNIST's classes: every epoch would score 0."""
    config = TrainConfig(training_data=str(BREASTMNIST), out_dir="", validation_data=str(SHARED_DATA / "retinamnist.npz"))
    with pytest.raises(CbirError, match=r"retinamnist.npz: no validation class is a training class \(validation: "
                                        r"'0', '1', '2', '3', '4'; training: 'malignant', 'normal, benign'\)$"):
        split_training_data(config)


def test_generalise_keeps_classes_unseen():
    config = TrainConfig(training_data=str(SHARED_DATA / "mednist_12k.npz"), out_dir="", generalise=True, seed=3)
    train, validation, unseen = split_training_data(config)
    trained = {item.label for item in train}
    assert len(trained) == 3 and len(unseen) == 3 and not trained & set(unseen)
    assert {item.label for item in validation} <= trained
    explicit = TrainConfig(training_data=str(SHARED_DATA / "mednist_12k.npz"), out_dir="", generalise=True,
                           train_classes=["Hand", "CXR"])
    assert split_training_data(explicit)[2] == ["AbdomenCT", "BreastMRI", "ChestCT", "HeadCT"]


def quick_config(out_dir, **changes) -> TrainConfig:
    settings = dict(training_data=str(BREASTMNIST), out_dir=str(out_dir), model="efficientnet_lite0",
                    input_size=32, loss="arcface", num_features=16, num_epochs=2, batch_size=8,
                    max_batches=2, workers=0, device="cpu")
    settings.update(changes)
    return TrainConfig(**settings)


def test_training_writes_log_curves_and_loadable_checkpoints(tmp_path):
    report = train_extractor(quick_config(tmp_path / "run", knn_weighting=True), progress=False)
    rows = list(csv.DictReader(open(report.log)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # epoch 0: the starting point
    assert {"loss", "precision_at_1", "mean_average_precision_at_r", "knn_wrong_share", "lr", "seconds"} <= set(rows[0])
    assert Image.open(report.curves).size[0] > 800
    extractor = load_checkpoint(report.best).for_inference("cpu")
    assert extractor.spec.embedding_dim == 16 and extractor.spec.class_names == ("malignant", "normal, benign")
    assert extractor.spec.training["loss"] == "arcface" and extractor.spec.input_size == 32
    image = np.load(BREASTMNIST)["test_images"][:4]
    vectors = extractor.embed(torch.stack([extractor.preprocess(Image.fromarray(a).convert("RGB")) for a in image]))
    assert vectors.shape == (4, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    probabilities = extractor.class_probabilities(vectors)
    assert probabilities.shape == (4, 2) and np.allclose(probabilities.sum(axis=1), 1)


def test_deep_ranking_multiscale_model_trains_and_reloads(tmp_path):
    report = train_extractor(quick_config(tmp_path / "dr", dr_model=True, num_epochs=1, freeze=True,
                                          loss="triplet"), progress=False)
    extractor = load_checkpoint(report.last)
    assert extractor.spec.multiscale and len(extractor.backbone.branches) == 2
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert extractor.for_inference("cpu").embed(images).shape == (2, 16)
    from cbir.models.factory import create_extractor

    fresh = create_extractor("efficientnet_lite0", input_size=32, embedding_dim=16, multiscale=True).state_dict()
    saved = extractor.state_dict()
    stem = next(k for k in saved if k.startswith("backbone.backbone.") and k.endswith("weight"))
    assert torch.equal(saved[stem], fresh[stem]), "--freeze must keep the pretrained backbone as it was"
    assert not torch.equal(saved["head.weight"], fresh["head.weight"])


def test_an_interrupted_run_resumes(tmp_path):
    first = train_extractor(quick_config(tmp_path / "run", num_epochs=1, loss="margin"), progress=False)
    assert len(first.epoch_seconds) == 1
    with open(first.log, "a", encoding="utf-8") as log:  # stopped after epoch 2's log line, before its state
        log.write("2,0.5,0.1,0.1,0.0001,1.0\n")
    resumed = train_extractor(quick_config(tmp_path / "run", num_epochs=3, loss="margin", resume=True), progress=False)
    assert len(resumed.epoch_seconds) == 2  # epochs 2 and 3 only
    rows = list(csv.DictReader(open(resumed.log)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert load_checkpoint(resumed.last).spec.training["epoch"] == 3
    # The cosine schedule of the 3 epochs asked for now, not of the first run's 1 (which fell to 0).
    assert [float(r["lr"]) for r in rows[2:]] == pytest.approx([0.75 * 1e-3, 0.25 * 1e-3])  # of the default 1e-3


def test_a_resume_that_cannot_continue_is_refused_in_one_line(tmp_path):
    with pytest.warns(UserWarning, match="does not exist, so training starts afresh"):
        train_extractor(quick_config(tmp_path / "run", num_epochs=1, resume=True), progress=False)
    with pytest.raises(CbirError, match=r"this run changes .*\(--num-features 16 -> 32; --loss arcface -> margin\)"):
        train_extractor(quick_config(tmp_path / "run", num_epochs=2, loss="margin", num_features=32, resume=True),
                        progress=False)
    (tmp_path / "run" / "state.pt").write_bytes(b"half a state")
    with pytest.raises(CbirError, match="not a readable training state"):
        train_extractor(quick_config(tmp_path / "run", num_epochs=2, resume=True), progress=False)


@pytest.mark.parametrize("scheduler", ["cosine", "step", "exponential", "none"])
def test_a_fresh_run_follows_torchs_schedule(scheduler):
    config = TrainConfig(training_data="", out_dir="", scheduler=scheduler, num_epochs=7, step_size=2, gamma=0.5)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = {"cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7),
                "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5),
                "exponential": lambda: torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5),
                "none": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)}[scheduler]()
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [learning_rate_factor(config, epoch) for epoch in range(1, 8)] == pytest.approx(rates, abs=1e-12)


def test_training_the_last_stages_from_cached_activations_leaves_the_first_ones_as_they_were(tmp_path):
    report = train_extractor(quick_config(tmp_path / "cached", loss="cross_entropy", lr=1e-2, train_blocks=2, views=2,
                                          max_batches=4), progress=False)
    trained = load_checkpoint(report.last).state_dict()
    from cbir.models.factory import create_extractor

    start = create_extractor("efficientnet_lite0", input_size=32, embedding_dim=16).state_dict()
    assert set(trained) - {"classifier"} == set(start)
    frozen = [k for k in start if k.startswith(("backbone.conv_stem", "backbone.blocks.0.", "backbone.blocks.4."))]
    trained_part = [k for k in start if k.startswith(("backbone.blocks.5.", "backbone.blocks.6.", "backbone.conv_head"))]
    assert frozen and trained_part
    assert all(torch.equal(trained[k], start[k]) for k in frozen)
    assert any(not torch.equal(trained[k], start[k]) for k in trained_part if k.endswith("weight"))
    rows = list(csv.DictReader(open(report.log)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and len(report.epoch_seconds) == 2


def test_cached_training_validates_on_what_the_whole_extractor_gives(tmp_path):
    """The epoch's validation numbers come from cached activations; the saved extractor, run on the
    images themselves, must rank the validation images the same way."""
    report = train_extractor(quick_config(tmp_path / "same", loss="cross_entropy", train_blocks=1, views=1,
                                          num_epochs=1), progress=False)
    extractor = load_checkpoint(report.last).for_inference("cpu")
    data = np.load(BREASTMNIST)
    images = torch.stack([extractor.preprocess(Image.fromarray(a).convert("RGB")) for a in data["val_images"]])
    references = torch.stack([extractor.preprocess(Image.fromarray(a).convert("RGB")) for a in data["train_images"]])
    nearest = (extractor.embed(images) @ extractor.embed(references).T).argmax(axis=1)
    precision = float((data["train_labels"].ravel()[nearest] == data["val_labels"].ravel()).mean())
    logged = float(list(csv.DictReader(open(report.log)))[-1]["precision_at_1"])
    assert abs(precision - logged) <= 1 / len(images) + 1e-9  # float16 activations may flip one tie


@pytest.mark.parametrize("changes,message", [
    (dict(train_blocks=2, freeze=True), "--train-blocks 2 trains backbone stages, which --freeze does not"),
    (dict(views=0), "--views must be at least 1"),
])
def test_cached_training_flags_that_do_not_go_together_are_refused(changes, message):
    with pytest.raises(CbirError, match=message):
        TrainConfig(training_data="", out_dir="", **changes).check()


def test_a_backbone_that_cannot_be_split_trains_whole_by_default_and_refuses_train_blocks(tmp_path):
    assert TrainConfig(training_data="", out_dir="").blocks_to_train(None) == 0
    assert TrainConfig(training_data="", out_dir="").blocks_to_train(7) == 4
    with pytest.raises(CbirError, match="--train-blocks: resnet18 is not built as an EfficientNet"):
        train_extractor(quick_config(tmp_path / "resnet", model="resnet18", pretrained=False, train_blocks=1),
                        progress=False)
    with pytest.raises(CbirError, match="--train-blocks 9: efficientnet_lite0 has 7 stages; give 1 to 7"):
        train_extractor(quick_config(tmp_path / "lite0", train_blocks=9), progress=False)
