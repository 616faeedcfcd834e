"""Silence the converters' chatter (Python prints and C++ logs) around one call."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile


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
