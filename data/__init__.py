"""The shipped data sets (see README.md here), installed as the package `mgsr_cli.shipped_data`."""
