"""`python remove_images.py ...` is `cbir remove ...`; see `python remove_images.py --help`."""
from cbir.cli.main import command

if __name__ == "__main__":
    command("remove")
