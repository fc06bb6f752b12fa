"""WebUI glue that is the same on every WebUI: ``<ostaf:…>`` tags, activation plans, the
adapter registry, cards, jobs, the HTTP API, training jobs and previews; no WebUI module.
Imports only ``lib_ostaf.method``, ``lib_ostaf.files`` and ``lib_ostaf.errors``."""
