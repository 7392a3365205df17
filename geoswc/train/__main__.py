"""``accelerate launch -m geoswc.train STAGE ...``: the stages of ``geoswc train`` on every launched process."""

import sys

from geoswc.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
