"""The method, host-independent: targets, the hypernetwork and its offsets ΔW, attribute
training (OSTAF), object implantation, and the ``Host`` protocol a model must offer.
Imports only ``lib_ostaf.files`` and ``lib_ostaf.errors``."""
