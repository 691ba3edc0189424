"""cascadec: compress a pretrained CNN with cascaded channel pruning and prove it on real backends."""

__version__ = "0.1.0"
