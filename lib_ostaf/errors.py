"""Errors the user can act on. Every bad input raises one of these with a clear message."""


class OstafError(Exception):
    """Base class: a problem the user can fix (bad input, incompatible file, ...)."""


class InputError(OstafError, ValueError):
    """A user-supplied value (image, name, rank, λ, ...) is invalid."""


class AdapterFileError(OstafError):
    """An adapter file is unreadable, torn, hostile or does not fit the model."""


class IncompatibleModelError(OstafError):
    """An adapter was made for another model family or does not fit the loaded UNet."""


class Interrupted(OstafError):
    """Training was interrupted by the user; nothing was written."""


class TrainingDiverged(OstafError):
    """The loss or the gradients stopped being finite (learning rate too high, fp16
    overflow); nothing was written."""


class ModelNotFinite(OstafError):
    """The loaded model's own prediction is not finite on this reference, before any
    training (a model or VAE overflowing in its precision); nothing was trained."""
