import sys

from nemotune.recipes.cli import main

sys.exit(main())
