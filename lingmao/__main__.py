"""`python -m lingmao COMMAND ...`: the same as the `lingmao` console script."""

import sys

from lingmao.cli import main

sys.exit(main())
