"""Silence the converters' chatter (Python prints and C++ logs) around one call."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings


@contextlib.contextmanager
def quiet():
    """Send stdout and stderr, Python's and the file descriptors', to a buffer.

    The converters print hundreds of lines (tensor listings, MLIR passes) that bury
    tledge's own output. What they printed is attached to an exception that escapes,
    so nothing is lost when something goes wrong.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                saved.append(os.dup(fd))
                os.dup2(sink.fileno(), fd)
        except OSError:  # no real file descriptors (some notebook kernels): quiet Python only
            for fd in saved:
                os.close(fd)
            saved = []
        python_out = io.StringIO()
        try:
            with contextlib.redirect_stdout(python_out), contextlib.redirect_stderr(python_out):
                yield
        except Exception as error:
            sink.seek(0)
            error.add_note(python_out.getvalue()[-2000:] +
                           sink.read().decode(errors="replace")[-2000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def quiet_tensorflow() -> None:
    """Import TensorFlow with its start-up log wall silenced, and keep the frameworks' Python
    warnings out of the user's terminal. Called by the CLI and by the library API's calls
    (`tledge.build`, `tledge.Run`), never at `import tledge`: a program that imported
    TensorFlow itself keeps its own settings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for module in ("tensorflow", "keras", "tf2onnx", "absl", "google", "onnx", "openvino", "nncf"):
        warnings.filterwarnings("ignore", module=module)
    if "tensorflow" in sys.modules:
        return
    with quiet():
        import tensorflow  # noqa: F401
