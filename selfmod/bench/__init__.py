"""Benchmarks that need the library's internals and are also run from the command line
(``selfmod bench ...``); ``benchmarks/`` holds the scripts."""
