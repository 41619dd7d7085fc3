"""`python -m train`: training runs, the data cache and the digits evaluation, from the command line."""
