"""`python train_extractor.py ...` is `cbir train ...`; see `python train_extractor.py --help`."""
from cbir.cli.main import command

if __name__ == "__main__":
    command("train")
