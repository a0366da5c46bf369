"""trimtab's quantized weights: the canonical format (format.py) and the quantizers that make it."""
