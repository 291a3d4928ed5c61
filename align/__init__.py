"""align: align language models with RL and direct-alignment objectives."""

__version__ = "0.1.0"
