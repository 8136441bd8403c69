"""Baseline reward recipes the paper compares against (METHOD.md §4): SFT, RewardDance-style, OPD."""
