"""`cbir train` (train_extractor.py): a metric-learned feature extractor."""
from __future__ import annotations

from cbir.cli.flags import COUNT, NON_NEGATIVE, NON_NEGATIVE_REAL, OUTPUT_FOLDER, POSITIVE, real, whole
from cbir.images.sources import source_path
from cbir.options import LOSSES, MAX_EMBEDDING_DIM, SCHEDULERS


def run(args) -> int:
    for data in filter(None, (args.training_data, args.validation_data)):
        source_path(data)  # a mistyped path refused at once, not after seconds of importing torch
    from cbir import api
    from cbir.training.config import TrainConfig

    config = TrainConfig(
        training_data=args.training_data, out_dir=args.weights, validation_data=args.validation_data,
        val_fraction=args.val_fraction, model=args.model, weights=args.backbone_weights,
        pretrained=not args.no_pretrained, input_size=args.input_size, loss=args.loss,
        num_features=args.num_features, num_epochs=args.num_epochs, batch_size=args.batch_size,
        m_per_class=args.m_per_class, optimizer=args.optimizer, lr=args.lr, lr_proxies=args.lr_proxies,
        beta_lr=args.beta_lr, decay=args.decay, scheduler=args.scheduler, step_size=args.step_size,
        gamma=args.gamma, freeze=args.freeze, train_blocks=args.train_blocks, views=args.views,
        dr_model=args.dr_model, head_init=args.head_init, knn_weighting=args.knn_weighting, knn_boost=args.knn_boost,
        generalise=args.generalise, train_classes=args.train_classes, seed=args.seed, workers=args.workers,
        device=args.device, max_batches=args.max_batches, resume=args.load, overwrite=args.overwrite)
    report = api.train(config, progress=not args.quiet)
    best = report.best_metrics
    mean_epoch = sum(report.epoch_seconds) / max(len(report.epoch_seconds), 1)
    print(f"best epoch {report.best_epoch}: precision@1 {float(best.get('precision_at_1', 0)):.3f}, "
          f"MAP@R {float(best.get('mean_average_precision_at_r', 0)):.3f} (validation vs training images)")
    print(f"{len(report.epoch_seconds)} epoch(s) this run, {mean_epoch:.1f} s per epoch")
    if report.unseen_classes:
        print(f"unseen classes (not trained on): {', '.join(report.unseen_classes)}")
    print(f"checkpoints: {report.best} (best), {report.last} (last); log {report.log}; curves {report.curves}")
    print(f"index with it: python add_images.py --db-name DB --path DIR --weights {report.best}")
    return 0


def register(commands) -> None:
    train = commands.add_parser("train", help="train a metric-learned feature extractor",
                                description="Fine-tune a backbone with an embedding head so images of the same "
                                            "class embed close together (pytorch-metric-learning losses, "
                                            "class-balanced batches); validation every epoch; best and last "
                                            "self-describing checkpoints in --weights.")
    train.add_argument("--training-data", required=True, help="class-per-folder directory or MedMNIST-style .npz")
    train.add_argument("--validation-data", default=None,
                       help="validation folder (default: the .npz val split, else a stratified --val-fraction)")
    train.add_argument("--val-fraction", type=real(0, 1, below=True), default=0.15,
                       help="hold-out share of a folder (default: 0.15)")
    train.add_argument("--weights", type=OUTPUT_FOLDER, required=True,
                       help="output folder for checkpoints, log and curves")
    train.add_argument("--model", default="efficientnet_lite0",
                       help="backbone (default efficientnet_lite0, whose ImageNet weights work offline)")
    train.add_argument("--backbone-weights", default=None, help="backbone weights file to start from (e.g. KimiaNet)")
    train.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    train.add_argument("--input-size", type=COUNT, default=None, help="image side in pixels (default: the backbone's)")
    train.add_argument("--loss", default="cross_entropy", choices=LOSSES,
                       help="metric-learning loss (default: cross_entropy, through a cosine classifier)")
    train.add_argument("--num-features", type=whole(1, MAX_EMBEDDING_DIM), default=128,
                       help=f"embedding size (default: 128, at most {MAX_EMBEDDING_DIM})")
    train.add_argument("--num-epochs", type=COUNT, default=20,
                       help="epochs (default: 20); the best by validation is kept")
    train.add_argument("--batch-size", type=whole(2), default=32,
                       help="images per batch, 2 or more: metric losses compare images (default: 32)")
    train.add_argument("--m-per-class", type=COUNT, default=4, help="images per class in a batch (default: 4)")
    train.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"], help="default: adamw")
    train.add_argument("--lr", type=POSITIVE, default=1e-3,
                       help="learning rate of the model (default: 1e-3; 1e-4 suits --train-blocks 0)")
    train.add_argument("--lr-proxies", type=POSITIVE, default=1e-2, help="learning rate of proxies/class weights")
    train.add_argument("--beta-lr", type=POSITIVE, default=1e-2, help="learning rate of the margin loss's beta")
    train.add_argument("--decay", type=NON_NEGATIVE_REAL, default=1e-4, help="weight decay (default: 1e-4)")
    train.add_argument("--scheduler", default="cosine", choices=SCHEDULERS, help="learning-rate schedule")
    train.add_argument("--step-size", type=COUNT, default=5, help="epochs per step of the step scheduler")
    train.add_argument("--gamma", type=POSITIVE, default=0.5, help="decay factor of step/exponential schedulers")
    train.add_argument("--train-blocks", type=NON_NEGATIVE, default=None,
                       help="train the last N stages of the backbone and the head from activations of the frozen "
                            "first stages, computed once per image and view (default: 4 for EfficientNet "
                            "backbones, an epoch then costs a fraction of the whole network's); 0: the whole "
                            "network from images (the default for other backbones)")
    train.add_argument("--views", type=COUNT, default=4,
                       help="views of each training image cached for --train-blocks: the plain one and the "
                            "rest augmented (default: 4)")
    train.add_argument("--freeze", action="store_true", help="freeze the backbone: train the head only")
    train.add_argument("--head-init", default="pca", choices=["pca", "random"],
                       help="pca (default): the head starts as a projection onto the training features' principal "
                            "components and class weights at class means, so training starts from the pretrained "
                            "geometry; random: from scratch")
    train.add_argument("--dr-model", action="store_true",
                       help="Deep Ranking multi-scale model: backbone + two shallow branches on 4:1 and 8:1 "
                            "sub-sampled images, concatenated and projected")
    train.add_argument("--knn-weighting", action="store_true",
                       help="examples that kNN on the current embedding gets wrong weigh 1+--knn-boost")
    train.add_argument("--knn-boost", type=NON_NEGATIVE_REAL, default=1.0, help="extra weight of kNN-misclassified examples")
    train.add_argument("--generalise", action="store_true",
                       help="train on a subset of classes (--train-classes, default a seeded half); the rest "
                            "stay unseen for testing")
    train.add_argument("--train-classes", nargs="+", default=[], help="the classes --generalise trains on")
    train.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of everything random (default: 0)")
    train.add_argument("--workers", type=NON_NEGATIVE, default=None, help="decoding processes (default: min(4, cores))")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--max-batches", type=COUNT, default=None, help="batches per epoch at most (quick runs)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--load", "--resume", dest="load", action="store_true",
                       help="resume the run in --weights from its last finished epoch; a larger "
                            "--num-epochs trains on, the learning-rate schedule stretched to it; the flags that "
                            "shape the model (--model, --input-size, --num-features, --loss, --optimizer, "
                            "--freeze, --dr-model) and the classes must stay as they were")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --weights (without it or --load, a folder holding "
                            "checkpoints is refused: databases built with them find them there)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=run, after_stop="the checkpoints of the last finished epoch are kept; re-run the "
                                                "same command with --load to resume")
