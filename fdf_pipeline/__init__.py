"""The main job: every fdf stage in order (`fdf-pipeline`), above the stages it runs.

It imports the stages' own `run` functions (and eval's FID plot); no stage imports it.
"""
