"""Support code for the tests and benchmarks: the real tools, the node as a process, helpers."""
