"""Export: the trained model as the files a device runs.

    stage             the export stage: every format the recipe lists, recorded in the manifest
    tflite, onnx,     one exporter per family (`export_<family>`), rows from tledge.formats
    savedmodel
    int8              int8 that explains (per-layer diagnosis) and repairs itself
    metadata          tledge's own metadata and TFLite's standard metadata, embedded
    tflite_standard   the TFLite Model Metadata flatbuffer, written and read without a library
"""
