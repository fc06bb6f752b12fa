"""The adapter file format: kohya-keyed LoRA ``.safetensors`` with their metadata, hashes and
atomic writes, and the UNet layer naming behind the keys.
Imports only ``lib_ostaf.errors``."""
