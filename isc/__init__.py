"""isc-platform: MLflow-tracked image copy detection (ISC21 descriptor track recipe).

The package layout follows the data flow:
``data`` -> ``data.augment`` -> ``models``/``losses`` -> ``train`` -> ``extract`` ->
``postprocess`` -> ``metrics`` (evaluate) -> ``tune`` -> ``registry`` (top-level package).
"""

__version__ = "0.1.0"
