"""The work of one data-preparation process: decode image files straight into the cache file.

Kept apart from the stages so a worker process (`python -c` running `main`, as
`tledge.data.prepare.WORKER_COMMAND` says) imports only the data package, the run
directory's helpers, numpy and PIL (never TensorFlow), and so the single-process path runs
the very same function.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from tledge.data.cache import DIGEST_BYTES
from tledge.data.images import load_image
from tledge.errors import DataError


def decode_chunk(path, offset, size, items):
    """Decode `items` ([(row, image file)]) at `size` into rows of the .npy at `path`.

    Returns [(row, pixel digest or None, reason or None)]: an unreadable file is reported,
    not raised, so one pass finds every bad file of a large folder.
    """
    row_bytes = int(size[0]) * int(size[1]) * 3
    results = []
    descriptor = os.open(path, os.O_WRONLY)
    try:
        for row, file in items:
            try:
                pixels = load_image(file, size)
            except DataError as error:
                results.append((row, None, _reason(str(error), file)))
                continue
            except Exception as error:  # a decoder bug must not lose the whole pass
                results.append((row, None, f"{type(error).__name__}: {error}"))
                continue
            data = pixels.tobytes()
            os.pwrite(descriptor, data, offset + row * row_bytes)
            results.append((row, hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest(), None))
    finally:
        os.close(descriptor)
    return results


def _reason(message, file):
    """The loader's message without the file name it starts with."""
    prefix = f"{file}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def main() -> None:
    """Serve chunks on stdin (one JSON list of `decode_chunk`'s arguments per line), one JSON
    line of [row, hex digest or null, reason or null] results per chunk on stdout."""
    for line in sys.stdin:
        results = decode_chunk(*json.loads(line))
        sys.stdout.write(json.dumps([(row, digest.hex() if digest else None, reason)
                                     for row, digest, reason in results]) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
