"""The training system: the config (config.py) -> the build step (build.py) -> the loop (loop.py), with the rooms
engines/, tracking/ and evaluation/. `python -m trainer` runs it."""
