"""`python add_images.py ...` is `cbir add ...`; see `python add_images.py --help`."""
from cbir.cli.main import command

if __name__ == "__main__":
    command("add")
