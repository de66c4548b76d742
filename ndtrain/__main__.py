"""`python -m ndtrain ...` is the `ndtrain` command."""
import sys

from ndtrain.launch.cli import main

sys.exit(main())
