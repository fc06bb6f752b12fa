"""One adapter per host (A1111, Forge and its forks, diffusers) and the device choice: the
only code that touches a WebUI's own modules.
Imports ``lib_ostaf.webui``, ``lib_ostaf.world``, ``lib_ostaf.method``, ``files`` and ``errors``."""
