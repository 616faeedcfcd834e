"""The code every process of tledge needs, the device's included: the figures of a classifier
(`metrics`), the machine's facts (`machine`), an artifact in its runtime (`engines`), timing
(`timing`) and the device benchmark (`device`).

Standard library and numpy only at module top, and nothing of tledge outside this package
(imports within it are relative): `tledge bundle` copies it whole into every bundle as
`tledge_core/`, beside a `bench_device.py` that runs `tledge_core.device`.
"""
