"""The leakage check: exact duplicate images within and across train, val and test.

Every prepared image has a digest of its pixels (after decoding and resizing), so the check
costs a dictionary over digests, not a pass over pixels. A test image that is also a training
image inflates test accuracy; a split full of repeats weighs some images more than others.
"""

from __future__ import annotations



_ORDER = ("train", "val", "test")


def find_duplicates(splits) -> dict:
    """{"summary": counts, "pairs": [...]} of the splits' exact pixel duplicates.

    Images with the same pixels form a group; each group gives one pair per member after its
    first (first member, that member). Summary counts: `within` (per split, images that repeat
    an earlier image of the same split), `across` ("train/test": test images whose pixels are
    also in train, and so on) and `total` (images with an earlier duplicate anywhere).
    """
    import numpy as np
    digests = [getattr(splits, f"x_{split}").digests for split in _ORDER]
    every = np.concatenate(digests) if sum(map(len, digests)) else np.zeros((0, 16), np.uint8)
    keys = every.view(np.dtype((np.void, every.shape[1]))).ravel() if len(every) else every
    # Only images whose digest occurs more than once get a record: memory stays small
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True) \
        if len(keys) else (None, np.zeros(0, np.int64), np.zeros(0, np.int64))
    repeated = np.flatnonzero(counts[inverse] > 1)
    offsets = np.cumsum([0] + [len(part) for part in digests])
    groups: dict[int, list] = {}
    for position in repeated:  # in train, val, test order, each split in its own order
        which = int(np.searchsorted(offsets, position, side="right") - 1)
        split, index = _ORDER[which], int(position - offsets[which])
        files = splits.record["splits"][split].get("files")
        groups.setdefault(int(inverse[position]), []).append(
            {"split": split, "index": index, **({"file": files[index]} if files else {})})
    within = {split: 0 for split in _ORDER}
    across = {f"{a}/{b}": 0 for i, a in enumerate(_ORDER) for b in _ORDER[i + 1:]}
    pairs, total = [], 0
    for members in groups.values():
        if len(members) < 2:
            continue
        total += len(members) - 1
        first = members[0]
        seen = {first["split"]}
        for member in members[1:]:
            pairs.append({"first": first, "duplicate": member})
            if member["split"] in seen:
                within[member["split"]] += 1
            else:
                earlier = next(split for split in _ORDER if split in seen)
                across[f"{earlier}/{member['split']}"] += 1
                seen.add(member["split"])
    summary = {"total": total, "within": within, "across": across}
    return {"summary": summary, "pairs": pairs}


def duplicate_line(summary) -> str:
    """One line for the build output, loudest about test images that are also in train."""
    across = ", ".join(f"{count} {name}" for name, count in summary["across"].items() if count)
    within = ", ".join(f"{count} in {name}" for name, count in summary["within"].items() if count)
    parts = [f"across splits: {across}" if across else "", f"within: {within}" if within else ""]
    warning = " (duplicates across splits inflate validation and test accuracy)" if across else ""
    return (f"data: {summary['total']} exact duplicate image(s), "
            + "; ".join(part for part in parts if part) + warning + "; pairs in duplicates.json")
