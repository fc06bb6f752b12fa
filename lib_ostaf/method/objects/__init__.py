"""Object implantation (Lu, Xie, Guo 2024): one image, one or several objects, each a new word.
Imports only lib_ostaf.method, lib_ostaf.files and lib_ostaf.errors (docs/architecture.md)."""

from lib_ostaf.method.embeddings import EMBEDDINGS_FOLDER
from lib_ostaf.method.objects.export import (
    BUNDLE_INFIX,
    MASK_INFIX,
    ObjectFiles,
    export_objects,
    planned_files,
    refuse_existing,
)
from lib_ostaf.method.objects.prototype import (
    CLIP_MEAN,
    CLIP_STD,
    FALLBACK,
    PROTOTYPE,
    ClipTower,
    PrototypeInfo,
    class_word_vectors,
    masked_object,
    prototype_target,
    prototypical_embedding,
    resolve_tower,
)
from lib_ostaf.method.objects.training import (
    ObjectConfig,
    ObjectResult,
    ObjectSpec,
    anchor_loss,
    class_regularization,
    object_loss,
    objects_from_lists,
    prior_preservation_loss,
    relative_distance,
    train_objects,
)

__all__ = [
    "BUNDLE_INFIX",
    "CLIP_MEAN",
    "CLIP_STD",
    "EMBEDDINGS_FOLDER",
    "FALLBACK",
    "MASK_INFIX",
    "PROTOTYPE",
    "ClipTower",
    "ObjectConfig",
    "ObjectFiles",
    "ObjectResult",
    "ObjectSpec",
    "PrototypeInfo",
    "anchor_loss",
    "class_regularization",
    "class_word_vectors",
    "export_objects",
    "masked_object",
    "object_loss",
    "objects_from_lists",
    "planned_files",
    "prior_preservation_loss",
    "prototype_target",
    "prototypical_embedding",
    "refuse_existing",
    "relative_distance",
    "resolve_tower",
    "train_objects",
]
