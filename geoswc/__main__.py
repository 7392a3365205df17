import sys

from geoswc.cli import main

sys.exit(main())
