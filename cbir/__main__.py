from cbir.cli.main import command

command()
