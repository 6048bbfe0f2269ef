"""edgetvm: compile, run and tune ONNX models for edge boards with Apache TVM (Relax)."""

__version__ = "0.1.0"
