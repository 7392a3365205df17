"""``python -m geoswc COMMAND ...``, and ``accelerate launch -m geoswc fit|tag|train ...`` on every launched
process: the command line, the same as the ``geoswc`` console script."""

import sys

from geoswc.cli import main

if __name__ == "__main__":
    sys.exit(main())
