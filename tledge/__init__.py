"""tledge: from a one-file recipe to a verified edge deployment.

Importing tledge does not import TensorFlow; each stage imports what it needs.
"""

from tledge.errors import TledgeError
from tledge.recipe import load_recipe

__all__ = ["TledgeError", "load_recipe", "build"]


def build(recipe_path, *, out=None, log=print):
    """Run every stage for a recipe; see `tledge.pipeline.build`."""
    from tledge.pipeline import build as _build
    return _build(recipe_path, out=out, log=log)
