from peftkit.cli.entry import run

run()
