"""deepcontrol: the automatic gain control of Ruff (2017, arXiv:1706.03907) against batch norm."""

__version__ = "0.1.0"
