"""Everything between DICOM instances and graded levels. Runs ONNX Runtime only (never torch)."""
