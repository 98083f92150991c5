"""Simulated tester: a seeded, reproducible model of a multi-site wafer-sort tester."""

from .tester import TesterModel, TesterProfile

__all__ = ["TesterModel", "TesterProfile"]
