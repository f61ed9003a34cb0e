"""The shipped YAML recipes, installed as the package `mgsr_cli.recipes`."""
