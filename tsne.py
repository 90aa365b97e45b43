"""`python tsne.py ...` is `cbir tsne ...`; see `python tsne.py --help`."""
from cbir.cli.main import command

if __name__ == "__main__":
    command("tsne")
