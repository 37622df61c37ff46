"""Connectivity baselines the paper compares against: parcellation, connectomes, L2 logistic/ridge regression."""
