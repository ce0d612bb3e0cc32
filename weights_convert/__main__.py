"""`python -m weights_convert ...`: see `weights_convert.cli`."""

import sys

from weights_convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
