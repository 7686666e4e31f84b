import sys

from nemotune.data_prep.cli import main

sys.exit(main())
