"""Benchmarks behind `ndtrain bench NAME`: each module here has `add_arguments(parser)` and `main(args) -> int`."""
