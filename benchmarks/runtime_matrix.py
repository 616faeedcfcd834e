"""One image through every runtime path, interleaved, against Keras' `model.predict`.

MobileNetV2 1.0 at 224x224 (random weights: latency does not depend on their values; int8
is calibrated on random pixels, which sets its ranges but not its speed), batch 1:
  keras model.predict       what notebooks time
  keras compiled call       tledge's Keras runner (a traced tf.function)
  LiteRT fp32 / int8        tledge's LiteRT runner (XNNPACK)
  ONNX Runtime fp32 / int8  tledge's ONNX Runtime runner
  OpenVINO fp32 / int8      tledge's OpenVINO runner (the same .onnx files; fp32 at f32)

Every path is loaded and warmed first, then the timed runs go round the paths in turn (a
block of `--block` calls each per round, after one untimed call: runtimes' worker threads
spin for a while after a call and would slow the next path), so a slow spell of the machine
hits every path alike. The CPU's name
and vector ISA are printed: int8 speed depends on VNNI / AMX.

    python benchmarks/runtime_matrix.py [--threads 2] [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--block", type=int, default=5,
                        help="timed calls of one path in a row, after one untimed call")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    from tledge.core.timing import summarize, time_runner
    from tledge.core.machine import machine_facts
    from tledge.export.onnx import export_onnx
    from tledge.export.tflite import export_tflite
    from tledge.quiet import quiet
    from tledge.runners import RUNTIMES

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    size = (args.size, args.size)
    inputs = keras.Input((*size, 3), name="image")
    backbone = keras.applications.MobileNetV2(input_shape=(*size, 3), include_top=False,
                                              weights=None)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(backbone(x, training=False))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    image = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)

    class Predict:  # model.predict behind the runner interface, for the same timing loop
        def run(self, prepared):
            return model.predict(prepared, verbose=0)

    folder = Path(tempfile.mkdtemp(prefix="tledge-bench-"))
    keras_path = folder / "model.keras"
    model.save(keras_path)
    calibration = np.random.default_rng(1).integers(0, 256, (32, *size, 3), dtype=np.uint8)
    with quiet():
        specs = {(family, precision): exporter(model, folder / f"{precision}.{family}",
                                               precision=precision, calibration=calibration)
                 for family, exporter in (("tflite", export_tflite), ("onnx", export_onnx))
                 for precision in ("fp32", "int8")}
    keras_spec = {"input": {"dtype": "float32"}, "output": {"dtype": "float32"}}
    paths = [("keras model.predict", None, None, keras_spec),
             ("keras compiled call", "keras", keras_path, keras_spec)]
    names = {"litert": "LiteRT", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
    for runtime, family in (("litert", "tflite"), ("onnxruntime", "onnx"), ("openvino", "onnx")):
        if RUNTIMES[runtime].unavailable():
            print(f"({names[runtime]}: {RUNTIMES[runtime].unavailable()})")
            continue
        paths += [(f"{names[runtime]} {precision}", runtime, folder / f"{precision}.{family}",
                   {**specs[(family, precision)], "precision": precision})
                  for precision in ("fp32", "int8")]
    loaded = []
    for label, runtime, path, spec in paths:
        runner = Predict() if runtime is None else \
            RUNTIMES[runtime].load(path, spec, args.threads, "cpu")
        prepared = image.astype(np.float32) if runtime is None else runner.prepare(image)
        time_runner(runner, prepared, warmup=5, min_runs=1, min_seconds=0.0)  # warm
        loaded.append((label, runner, prepared, getattr(runner, "executed", None)))
    samples = {label: [] for label, *_ in loaded}
    for _ in range(-(-args.runs // args.block)):  # interleaved: a block of each path per round
        for label, runner, prepared, _ in loaded:
            runner.run(prepared)  # untimed: the previous path's threads may still spin
            for _ in range(args.block):
                start = time.perf_counter_ns()
                runner.run(prepared)
                samples[label].append(time.perf_counter_ns() - start)
    results = [(label, summarize(samples[label], 1), executed)
               for label, _, _, executed in loaded]

    facts = machine_facts()
    base = results[0][1]["p50_ms"]
    print(f"MobileNetV2 1.0 {args.size}x{args.size}, batch 1, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d')}, {facts['cpu']} ({facts['isa']}, "
          f"{facts['cores']} cores)")
    print(f"{'path':<22} {'p50 ms':>9} {'p90 ms':>9} {'runs':>6} {'vs predict':>11}")
    for label, stats, executed in results:
        print(f"{label:<22} {stats['p50_ms']:9.2f} {stats['p90_ms']:9.2f} {stats['runs']:6d} "
              f"{base / stats['p50_ms']:10.1f}x" + (f"  ({executed})" if executed else ""))
    label, stats, _ = min(results[1:], key=lambda result: result[1]["p50_ms"])
    print(f"fastest: {label}, {base / stats['p50_ms']:.1f}x faster than model.predict "
          f"(goal: 40x on a CPU with VNNI; this one has {facts['isa']})")


if __name__ == "__main__":
    main()
