"""hf-weightprune: importance of weights, watched while a Hugging Face Trainer trains."""

__version__ = "0.1.0"
