"""The command line's argument checks: refused before anything runs, naming the flag and the reason."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from cbir.cli import evaluate, pictures
from cbir.cli.main import main
from cbir.errors import CbirError


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
    (["train", "--training_data", "t", "--weights", "w", "--batch_size", "1"], "--batch_size: must be at least 2, got 1"),
    (["evaluate", "--db_name", "d", "--k", "1", "0"], "--k: must be at least 1, got 0"),
    (["tsne", "--db_name", "d", "--max_points", "4"], "--max_points: must be at least 5, got 4"),
    (["dataset", "--path", "p", "--per_class", "31"], "--per_class: must be at most 30, got 31"),
    (["train", "--training_data", "t", "--weights", "w", "--num_features", "1000000"],
     "--num_features: must be at most 8192, got 1000000"),
])
def test_bad_numbers_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_good_numbers_pass():
    from cbir.cli.main import build_parser

    args = build_parser().parse_args(["evaluate", "--db_name", "d", "--k", "1", "11", "--temperature", "0.5",
                                      "--seed", "0"])
    assert args.k == [1, 11] and args.temperature == 0.5 and args.seed == 0


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("flags,message", [
    (lambda tmp, f: ["retrieve", "--db_name", "d", "--path", "q", "--json", str(tmp)], "is a folder, not a file"),
    (lambda tmp, f: ["retrieve", "--db_name", "d", "--path", "q", "--results_dir", str(f)], "is a file, not a folder"),
    (lambda tmp, f: ["retrieve", "--db_name", "d", "--path", "q", "--html", str(f / "a.html")],
     "is a file, so"),
    (lambda tmp, f: ["train", "--training_data", "t", "--weights", str(f / "run")], "is a file, so"),
    (lambda tmp, f: ["evaluate", "--db_name", "d", "--excel_path", str(tmp)], "is a folder, not a file"),
    (lambda tmp, f: ["tsne", "--db_name", "d", "--out", str(tmp / "tsne.txt")], "the name of a picture must end in .png"),
    (lambda tmp, f: ["tsne", "--db_name", "d", "--out", str(tmp / "tsne")], "the name of a picture must end in .png"),
])
def test_outputs_that_cannot_be_written_are_refused_before_the_work(flags, message, tmp_path, a_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(flags(tmp_path, a_file))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_a_name_too_long_is_refused_as_the_flag_is_parsed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--training_data", "t", "--weights", str(tmp_path / ("r" * 300))])
    assert capsys.readouterr().err.splitlines()[-1].endswith("File name too long")


def test_a_file_error_the_checks_could_not_foresee_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk, say: main reports any OSError as the file and the reason."""
    missing = tmp_path / "gone" / "stats.png"
    monkeypatch.setattr(pictures, "run_dataset", lambda args: missing.write_bytes(b""))
    assert main(["dataset", "--path", "p"]) == 2
    assert capsys.readouterr().err == f"error: {missing}: No such file or directory\n"


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n", "the groups CSV is not UTF-8 text (byte 0: invalid start byte)"),
    (b"only one column\n", "the groups CSV needs two columns per line"),
])
def test_a_groups_csv_that_is_no_two_column_text_is_one_error(tmp_path, content, message):
    """A picture given for --groups was a UnicodeDecodeError traceback."""
    path = tmp_path / "groups.csv"
    path.write_bytes(content)
    with pytest.raises(CbirError, match=rf"^{path}: {re.escape(message)}$"):
        evaluate._read_mapping(str(path), "groups")


@pytest.mark.parametrize("argv,advice", [
    # Re-running the same train command is refused now that its folder holds a run.
    (["train", "--training_data", "t", "--weights", "w"],
     "the checkpoints of the last finished epoch are kept; re-run the same command with --load to resume"),
    (["add", "--db_name", "d", "--path", "p"], "what was stored is kept; re-run the same command to add the rest"),
    (["info", "--db_name", "d"], "no database was changed"),
])
def test_an_interrupted_command_says_what_to_do_next(argv, advice, monkeypatch, capsys):
    def stopped_by_ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"cbir.cli.{argv[0]}"), "run", stopped_by_ctrl_c)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: {advice}"


@pytest.mark.parametrize("argv", [
    ["add", "--db_name", "d", "--path", "/no/such/folder"],
    ["retrieve", "--db_name", "d", "--path", "q.png", "--redis-url", "redis://127.0.0.1:1"],
    ["evaluate", "--db_name", "d", "--measure", "all"],
    ["evaluate", "--db_name", "d", "--path", "/no/such/folder"],
    ["train", "--training_data", "/no/such/folder", "--weights", "run"],
    ["dataset", "--path", "/no/such/folder"],
])
def test_a_mistake_in_the_flags_is_refused_before_torch_is_imported(argv):
    """torch and timm take 5-10 s to import on 2 cores: a typo must not wait for them."""
    check = ("import sys; from cbir.cli.main import main; code = main(sys.argv[1:]); "
             "sys.exit(10 if 'torch' in sys.modules else code)")
    assert subprocess.run([sys.executable, "-c", check, *argv], capture_output=True).returncode == 2
