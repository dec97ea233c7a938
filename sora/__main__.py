"""`python -m sora ...` runs the `sora` command."""
import sys

from .cli import main

sys.exit(main())
