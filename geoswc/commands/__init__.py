"""The `geoswc` subcommands: each module turns one command's flags into library calls (see `geoswc.cli`)."""
