"""kdtool: predict how small a knowledge-distillation student can get, from SAE measurements.

Importing this package is cheap on purpose: no torch, transformers or matplotlib at module
top, so `kdtool --help` and shell completion stay fast.
"""

__version__ = "0.1.0"
