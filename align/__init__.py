"""align: align language models with RL and direct-alignment objectives.

``from align import Recipe, train`` is the Python API (align/api.py); the names load on first use,
so importing a core module does not import the jobs.
"""

__version__ = "0.1.0"
__all__ = ["Recipe", "TrainResult", "train"]


def __getattr__(name: str):
    if name == "Recipe":
        from align.recipe import Recipe

        return Recipe
    if name in ("train", "TrainResult"):
        from align import api

        return getattr(api, name)
    raise AttributeError(f"module 'align' has no attribute {name!r}")
