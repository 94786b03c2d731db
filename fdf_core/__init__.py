"""fdf's common package: what every stage uses and no stage owns.

Arrows point down only: data_prep, fdf_builder, training and eval import fdf_core; fdf_core imports
none of them (tests/test_imports.py checks it).
"""
