"""Entry points and configs: the `critic-align` command line and the scripts behind it."""
