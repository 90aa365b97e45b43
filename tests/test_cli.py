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
    (["retrieve", "--db-name", "d", "--path", "q.png", "--nrt-neigh", "0"], "--nrt-neigh: must be at least 1, got 0"),
    (["retrieve", "--db-name", "d", "--path", "q", "--n-queries", "-1"], "--n-queries: must be at least 1, got -1"),
    (["retrieve", "--db-name", "d", "--path", "q", "--seed", "-1"], "--seed: must be at least 0, got -1"),
    (["add", "--db-name", "d", "--path", "p", "--batch-size", "many"], "--batch-size: 'many' is not a whole number"),
    (["add", "--db-name", "d", "--path", "p", "--input-size", "0"], "--input-size: must be at least 1, got 0"),
    (["train-index", "--db-name", "d", "--nlist", "0"], "--nlist: must be at least 1, got 0"),
    (["train-index", "--db-name", "d", "--target-recall", "1.5"], "--target-recall: must be in (0, 1], got 1.5"),
    (["train", "--training-data", "t", "--weights", "w", "--lr", "nan"], "--lr: must be above 0, got nan"),
    (["train", "--training-data", "t", "--weights", "w", "--val-fraction", "1"], "must be in [0, 1), got 1"),
    (["train", "--training-data", "t", "--weights", "w", "--decay", "-0.1"], "--decay: must be at least 0, got -0.1"),
    (["train", "--training-data", "t", "--weights", "w", "--batch-size", "1"], "--batch-size: must be at least 2, got 1"),
    (["evaluate", "--db-name", "d", "--k", "1", "0"], "--k: must be at least 1, got 0"),
    (["tsne", "--db-name", "d", "--max-points", "4"], "--max-points: must be at least 5, got 4"),
    (["dataset", "--path", "p", "--per-class", "31"], "--per-class: must be at most 30, got 31"),
    (["train", "--training-data", "t", "--weights", "w", "--num-features", "1000000"],
     "--num-features: must be at most 8192, got 1000000"),
])
def test_bad_numbers_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_good_numbers_pass():
    from cbir.cli.main import build_parser

    args = build_parser().parse_args(["evaluate", "--db-name", "d", "--k", "1", "11", "--temperature", "0.5",
                                      "--seed", "0"])
    assert args.k == [1, 11] and args.temperature == 0.5 and args.seed == 0


@pytest.mark.parametrize("command", ["add", "retrieve", "remove", "train-index", "train", "tsne", "dataset", "info",
                                     "evaluate"])
def test_help_shows_hyphenated_flags_only(command, capsys):
    from cbir.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "_" not in " ".join(word for word in capsys.readouterr().out.split() if word.startswith("--"))


def test_the_database_is_db_unless_named_as_in_the_thesis():
    from cbir.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["retrieve", "--path", "q.png"]).db_name == "db"
    # The thesis's underscore spellings are aliases, "--flag=value" too.
    thesis = parser.parse_args(["retrieve", "--db_name", "x", "--path", "q.png", "--nrt_neigh=3", "--results_dir", "r"])
    assert (thesis.db_name, thesis.nrt_neigh, str(thesis.results_dir)) == ("x", 3, "r")
    assert parser.parse_args(["info"]).db_name is None  # info without a name lists the databases


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("flags,message", [
    (lambda tmp, f: ["retrieve", "--db-name", "d", "--path", "q", "--json", str(tmp)], "is a folder, not a file"),
    (lambda tmp, f: ["retrieve", "--db-name", "d", "--path", "q", "--results-dir", str(f)], "is a file, not a folder"),
    (lambda tmp, f: ["retrieve", "--db-name", "d", "--path", "q", "--html", str(f / "a.html")],
     "is a file, so"),
    (lambda tmp, f: ["train", "--training-data", "t", "--weights", str(f / "run")], "is a file, so"),
    (lambda tmp, f: ["evaluate", "--db-name", "d", "--excel-path", str(tmp)], "is a folder, not a file"),
    (lambda tmp, f: ["tsne", "--db-name", "d", "--out", str(tmp / "tsne.txt")], "the name of a picture must end in .png"),
    (lambda tmp, f: ["tsne", "--db-name", "d", "--out", str(tmp / "tsne")], "the name of a picture must end in .png"),
])
def test_outputs_that_cannot_be_written_are_refused_before_the_work(flags, message, tmp_path, a_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(flags(tmp_path, a_file))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_a_name_too_long_is_refused_as_the_flag_is_parsed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--training-data", "t", "--weights", str(tmp_path / ("r" * 300))])
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
    (["train", "--training-data", "t", "--weights", "w"],
     "the checkpoints of the last finished epoch are kept; re-run the same command with --load to resume"),
    (["add", "--db-name", "d", "--path", "p"], "what was stored is kept; re-run the same command to add the rest"),
    (["info", "--db-name", "d"], "no database was changed"),
])
def test_an_interrupted_command_says_what_to_do_next(argv, advice, monkeypatch, capsys):
    def stopped_by_ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"cbir.cli.{argv[0]}"), "run", stopped_by_ctrl_c)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: {advice}"


@pytest.mark.parametrize("argv", [
    ["add", "--db-name", "d", "--path", "/no/such/folder"],
    ["retrieve", "--db-name", "d", "--path", "q.png", "--redis-url", "redis://127.0.0.1:1"],
    ["evaluate", "--db-name", "d", "--measure", "all"],
    ["evaluate", "--db-name", "d", "--path", "/no/such/folder"],
    ["train", "--training-data", "/no/such/folder", "--weights", "run"],
    ["dataset", "--path", "/no/such/folder"],
])
def test_a_mistake_in_the_flags_is_refused_before_torch_is_imported(argv):
    """torch and timm take 5-10 s to import on 2 cores: a typo must not wait for them."""
    check = ("import sys; from cbir.cli.main import main; code = main(sys.argv[1:]); "
             "sys.exit(10 if 'torch' in sys.modules else code)")
    assert subprocess.run([sys.executable, "-c", check, *argv], capture_output=True).returncode == 2
