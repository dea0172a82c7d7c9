"""The package's version, on its own so that any module can read it without importing the package's ``__init__``
(which imports the engine, the models and the pipeline)."""

__version__ = "0.1.0"
