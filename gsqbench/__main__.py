"""`python -m gsqbench` runs the CLI."""
import sys

from gsqbench.cli import main

sys.exit(main())
