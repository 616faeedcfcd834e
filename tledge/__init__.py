"""tledge: from a one-file recipe to a verified edge deployment.

Importing tledge does not import TensorFlow; each stage imports what it needs.
"""

from tledge.errors import TledgeError
from tledge.recipe.spec import load_recipe

__all__ = ["TledgeError", "load_recipe", "build"]


def build(recipe_path, *, out=None, log=print):
    """Run every stage for a recipe; see `tledge.stages.build`."""
    from tledge.stages import build as _build
    return _build(recipe_path, out=out, log=log)
