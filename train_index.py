"""`python train_index.py ...` is `cbir train-index ...`; see `python train_index.py --help`."""
from cbir.cli.main import command

if __name__ == "__main__":
    command("train-index")
