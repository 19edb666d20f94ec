"""gsqbench: evaluation and benchmarking suite for image tokenizers."""
__version__ = "0.1.0"
