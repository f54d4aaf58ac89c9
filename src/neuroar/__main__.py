from neuroar.cli import run

run()
