"""The toy attribute world (shapes × colours × textures) and the embedded tiny SD1 model
trained on it: the default model of the CLI, the demo and the tests.
Imports only ``lib_ostaf.method``, ``lib_ostaf.files`` and ``lib_ostaf.errors``."""
