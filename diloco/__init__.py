"""diloco: train one model across compute islands joined by a slow network.

DiLoCo, Douillard et al. 2023, https://arxiv.org/abs/2311.08105
"""

__version__ = "0.1.0"
