"""Every error tledge raises on purpose, in one place.

The CLI turns any `TledgeError` into a one-line message and exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class TledgeError(Exception):
    """Base class: a problem the user can fix, described so they can fix it."""


class RecipeError(TledgeError):
    """A recipe file is missing, unreadable or invalid.

    `problems` holds every problem found, each one line, so a user fixes all in one go.
    """

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = f"{self.path}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {problem}" for problem in self.problems)
            message = f"{self.path}: {len(self.problems)} problems\n{listed}"
        super().__init__(message)


class DataError(TledgeError):
    """A data source cannot be read: missing folder, no images, undecodable file, bad arrays."""


class WeightsError(TledgeError):
    """Backbone weights cannot be obtained or do not fit the backbone."""


class TrainError(TledgeError):
    """Training cannot start or cannot go on."""


class RunDirError(TledgeError):
    """A run directory is missing, incomplete or cannot be written."""


class ExportError(TledgeError):
    """An artifact could not be exported."""


class ArtifactError(TledgeError):
    """An artifact file given by the user is missing, of an unknown kind, or refused."""


class RuntimeUnavailable(TledgeError):
    """A runtime cannot run here (not installed, no such device); a bench row says why."""


class BundleError(TledgeError):
    """A device bundle cannot be made, or a device's result cannot be imported."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
