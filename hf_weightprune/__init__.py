"""hf-weightprune: importance of weights, watched while a Hugging Face Trainer trains."""

__version__ = "0.1.0"

from .callback import ImportanceCallback  # noqa: E402
from .config import ImportanceConfig  # noqa: E402
from .importance import Importance  # noqa: E402
from .state import load_importance  # noqa: E402

__all__ = ["Importance", "ImportanceCallback", "ImportanceConfig", "load_importance"]
