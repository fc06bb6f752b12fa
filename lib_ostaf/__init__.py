"""sd-webui-ostaf core: one-shot attribute tuning (OSTAF) and object implantation.

Layers (docs/architecture.md), imports one way: ``hosts`` → ``webui`` → ``method`` →
``files`` → ``errors``; ``world`` (toy world, tiny model) beside ``hosts``. Only ``hosts``
touch a WebUI's modules; nothing imports the command line (``cli``).
"""

__version__ = "0.1.0"
