"""isc-platform: MLflow-tracked image copy detection (ISC21 descriptor track recipe).

The package layout follows the data flow:
``data`` -> ``data.augment`` -> ``models``/``losses`` -> ``train`` -> ``extract`` ->
``postprocess`` -> ``knn``/``metrics``/``evaluation`` -> ``tune``; ``contract`` names what steps exchange.
The layers above it (``registry``, ``entrypoints``: top-level packages) import ``isc``, never the reverse.
"""

__version__ = "0.1.0"
