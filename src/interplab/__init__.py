"""interplab: a mechanistic interpretability workbench.

Every number comes with its control, and every method is first checked where the truth is known.
"""

__version__ = "0.1.0"
