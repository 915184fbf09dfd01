"""Measurement and process policy, apart from the library: model FLOPs, the speed benchmark, the host allocator."""
