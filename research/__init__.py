"""The research harness: the toy-world demo, the paper's tables and the benchmarks.

It depends one way on the library (`fastlightgen`) and the training package (`train`); neither imports it.
Generated reports are written to `reports/`, not beside this code.
"""
