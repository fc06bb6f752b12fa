"""sd-webui-ostaf core: one-shot attribute tuning (OSTAF) and object implantation.

Pure library: never imports WebUI modules. Hosts live in ``lib_ostaf.hosts``.
"""

__version__ = "0.1.0"
