"""tledge: from a one-file recipe to a verified edge deployment.

    import tledge
    recipe = tledge.load_recipe("recipes/quickstart.toml")
    tledge.build("recipes/quickstart.toml", out="models/quickstart")

Importing tledge does not import TensorFlow; each stage imports what it needs. The package is
the public face only: the architecture is in docs/architecture.md.
"""

from tledge.errors import TledgeError

__all__ = ["TledgeError", "load_recipe", "build"]


def __getattr__(name):
    # Resolved on first use, not here: every `import tledge.<module>` (a benchmark worker, a
    # data preparation process) runs this file first, and should not load every stage.
    if name == "build":
        from tledge.stages import build
        return build
    if name == "load_recipe":
        from tledge.recipe.load import load_recipe
        return load_recipe
    raise AttributeError(f"module 'tledge' has no attribute {name!r}")
