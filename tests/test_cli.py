"""The command line's argument checks: refused before anything runs, naming the flag and the reason."""
from __future__ import annotations

import pytest

from cbir.cli import main


@pytest.mark.parametrize("argv,message", [
    (["retrieve", "--db_name", "d", "--path", "q.png", "--nrt_neigh", "0"], "--nrt_neigh: must be at least 1, got 0"),
    (["retrieve", "--db_name", "d", "--path", "q", "--n_queries", "-1"], "--n_queries: must be at least 1, got -1"),
    (["retrieve", "--db_name", "d", "--path", "q", "--seed", "-1"], "--seed: must be at least 0, got -1"),
    (["add", "--db_name", "d", "--path", "p", "--batch_size", "many"], "--batch_size: 'many' is not a whole number"),
    (["add", "--db_name", "d", "--path", "p", "--input_size", "0"], "--input_size: must be at least 1, got 0"),
    (["train-index", "--db_name", "d", "--nlist", "0"], "--nlist: must be at least 1, got 0"),
    (["train-index", "--db_name", "d", "--target_recall", "1.5"], "--target_recall: must be in (0, 1], got 1.5"),
    (["train", "--training_data", "t", "--weights", "w", "--lr", "nan"], "--lr: must be above 0, got nan"),
    (["train", "--training_data", "t", "--weights", "w", "--val_fraction", "1"], "must be in [0, 1), got 1"),
    (["train", "--training_data", "t", "--weights", "w", "--decay", "-0.1"], "--decay: must be at least 0, got -0.1"),
    (["evaluate", "--db_name", "d", "--k", "1", "0"], "--k: must be at least 1, got 0"),
    (["tsne", "--db_name", "d", "--max_points", "0"], "--max_points: must be at least 1, got 0"),
])
def test_bad_numbers_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_good_numbers_pass():
    from cbir.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--db_name", "d", "--k", "1", "11", "--temperature", "0.5",
                                      "--seed", "0"])
    assert args.k == [1, 11] and args.temperature == 0.5 and args.seed == 0
