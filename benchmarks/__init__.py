"""fxjac benchmarks: ``python -m benchmarks.run [--quick]`` (see README, "Performance")."""
