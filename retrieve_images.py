"""`python retrieve_images.py ...` is `cbir retrieve ...`; see `python retrieve_images.py --help`."""
from cbir.cli.main import command

if __name__ == "__main__":
    command("retrieve")
