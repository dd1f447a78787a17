import sys

from pleascc.cli import main

sys.exit(main())
