"""The project's benchmarks (not part of the wheel); run them from the repository root, e.g.
``python -m benchmarks.step_speed --quick``."""
