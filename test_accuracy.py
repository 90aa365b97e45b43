"""`python test_accuracy.py ...` is `cbir evaluate ...`; see `python test_accuracy.py --help`."""
from cbir.cli.main import command

if __name__ == "__main__":
    command("evaluate")
