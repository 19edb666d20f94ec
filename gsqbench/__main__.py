"""`python -m gsqbench` runs the CLI."""
import sys

from gsqbench.cli import main

if __name__ == "__main__":  # guarded: `run --jobs` child processes (spawn) import this module again
    sys.exit(main())
