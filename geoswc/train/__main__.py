"""``accelerate launch -m geoswc.train STAGE ...``: another spelling of ``-m geoswc train STAGE ...``."""

import runpy
import sys

sys.argv[1:1] = ["train"]
runpy.run_module("geoswc", run_name="__main__", alter_sys=True)
