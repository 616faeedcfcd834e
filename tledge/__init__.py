"""tledge: from a one-file recipe to a verified edge deployment.

    import tledge
    run = tledge.build("recipes/quickstart.toml")   # every stage, quietly; a tledge.Run
    run.pick                                        # the artifact to ship, and its runtime
    run.predict("photo.jpg")                        # classified by the pick, in its runtime
    tledge.Run("models/quickstart").parity          # any run directory, checked first

Importing tledge does not import TensorFlow; each stage imports what it needs. The package is
the public face only (the API is tledge/api.py): the architecture is in docs/architecture.md.
"""

from tledge.errors import TledgeError

__all__ = ["TledgeError", "Run", "build", "load_recipe"]


def __getattr__(name):
    # Resolved on first use, not here: every `import tledge.<module>` (a benchmark worker, a
    # data preparation process) runs this file first, and should not load every stage.
    if name in ("build", "Run"):
        from tledge import api
        return getattr(api, name)
    if name == "load_recipe":
        from tledge.recipe.load import load_recipe
        return load_recipe
    raise AttributeError(f"module 'tledge' has no attribute {name!r}")
