"""Lung-focused preprocessing of chest X-rays on Ray Data."""
