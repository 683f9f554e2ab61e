"""Experiment scripts (not part of the library): python -m experiments.<name>."""
