"""``python -m benchmarks.step_speed [options]``: run the step-speed benchmark (``--help``)."""

from benchmarks.step_speed.runner import main

if __name__ == "__main__":
    main()
