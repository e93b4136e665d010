"""`python engine_builder/build_engine.py --model NAME ...` is `sencache build --model NAME ...`."""

import sys

from sencache.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
