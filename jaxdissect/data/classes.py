"""Where a data set's class labels meet a classifier's outputs: the one mapping between them.

A labelled data source numbers its classes its own way (a ``places:`` folder
by sorted folder name, ``SyntheticScenes`` by its scene list, TFDS by its
record labels); a classifier numbers its outputs as it was trained, and its
``model.json`` may list their names (``classes``). Every experiment that
compares a data label with a model output (classifier ablation, adversarial
attacks, unit plots by class) first maps the data's labels to the model's
output indices here, so the two numberings are never confused:

* the model lists its class names: each data class is matched by name (a data
  class that is not one of the model's is an error naming the close matches;
  the data may hold a subset of the model's classes);
* it lists none: ``class_order='sorted_folders'`` states that output ``i`` is
  the ``i``-th data class in sorted order (true of Places365), and then the
  data must hold exactly as many classes as the model has outputs;
* otherwise the mapping cannot be established, which is an error saying how to
  state it. Nothing is ever regrouped silently.

:func:`class_map` computes the mapping from names; :func:`model_labelled`
wraps a source so that its ``label`` are the model's output indices and its
``classes`` the model's class names.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Sequence

import numpy as np

from jaxdissect.errors import JaxDissectError

CLASS_ORDERS = ("metadata", "sorted_folders")


class ClassMappingError(JaxDissectError, ValueError):
    """The data's classes cannot be matched to the model's outputs; the message says why and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ClassMap:
    """``index[k]``: the model output of data label ``k``; ``names``: the model's class names, output order."""

    index: np.ndarray
    names: tuple[str, ...]


def data_classes(source) -> list[str] | None:
    """The class names a labelled source numbers its labels by (``classes`` or ``class_names``), or None."""
    names = getattr(source, "classes", None) or getattr(source, "class_names", None)
    return [str(n) for n in names] if names else None


def class_map(data_names: Sequence[str] | None, model_names: Sequence[str] | None, num_outputs: int | None, *,
              class_order: str = "metadata", data: str = "--data", model: str = "the model") -> ClassMap:
    """The mapping of data labels to model outputs (see the module docstring); raises :class:`ClassMappingError`.

    ``data_names``: the data's class names in label order (None: the data
    names none, e.g. a TFDS split). ``model_names``: ``classes`` of the
    model's ``model.json`` (None: not recorded). ``num_outputs``: the model's
    output count (None: not checked). ``data``/``model`` name the two in messages.
    """
    if class_order not in CLASS_ORDERS:
        raise ClassMappingError(f"--class_order={class_order}: use one of {', '.join(CLASS_ORDERS)}")
    model_names = [str(n) for n in model_names] if model_names else None
    data_names = [str(n) for n in data_names] if data_names else None
    if model_names is not None and num_outputs is not None and len(model_names) != num_outputs:
        raise ClassMappingError(f"{model} lists {len(model_names)} classes in model.json but has {num_outputs} "
                                "outputs; fix 'classes' in its model.json (one name per output, in order)")
    if class_order == "sorted_folders":
        if data_names is not None and data_names != sorted(data_names):
            raise ClassMappingError(f"--class_order=sorted_folders: {data} does not number its classes in sorted "
                                    "order; give a places:<folder> of class folders")
        count = len(data_names) if data_names is not None else None
        if num_outputs is not None and count is not None and count != num_outputs:
            raise ClassMappingError(f"--class_order=sorted_folders: {data} has {count} classes but {model} has "
                                    f"{num_outputs} outputs; give every class folder, or record the model's "
                                    "class names ('classes' in model.json) to match folders by name")
        if model_names is not None and data_names is not None and model_names != data_names:
            diff = next(i for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b)
            raise ClassMappingError(f"--class_order=sorted_folders says output i is the i-th class of {data}, but "
                                    f"{model}'s model.json names output {diff} {model_names[diff]!r} where "
                                    f"{data} has {data_names[diff]!r}; leave out --class_order to match by name")
        names = model_names or data_names
        if names is None:
            if num_outputs is None:
                raise ClassMappingError(f"neither {data} nor {model} names its classes")
            names = [str(i) for i in range(num_outputs)]
        return ClassMap(np.arange(len(names), dtype=np.int32), tuple(names))
    if model_names is None:
        raise ClassMappingError(f"{model}'s model.json lists no 'classes', so its outputs cannot be matched to the "
                                f"classes of {data}; add \"classes\": [...] to model.json (convert with --classes=FILE), "
                                "or pass --class_order=sorted_folders if output i is the i-th class folder in "
                                "sorted order")
    if data_names is None:
        raise ClassMappingError(f"{data} names no classes, so its labels cannot be matched to {model}'s outputs by "
                                "name; pass --class_order=sorted_folders if label i is output i")
    index = {c: i for i, c in enumerate(model_names)}
    unknown = [c for c in data_names if c not in index]
    if unknown:
        close = difflib.get_close_matches(unknown[0], model_names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ClassMappingError(f"{data}: class {'folder' if len(unknown) == 1 else 'folders'} "
                                f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''} "
                                f"{'is not a class' if len(unknown) == 1 else 'are not classes'} of {model}{hint}; "
                                f"its model.json lists {len(model_names)} classes, e.g. {', '.join(model_names[:5])}")
    return ClassMap(np.array([index[c] for c in data_names], np.int32), tuple(model_names))


class ModelLabelled:
    """A labelled source whose ``label`` are the model's output indices and ``classes`` its class names."""

    def __init__(self, source, mapping: ClassMap):
        self.source, self.mapping = source, mapping
        self.classes = list(mapping.names)
        self.name = getattr(source, "name", "data")

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def get_batch(self, indices) -> dict:
        batch = dict(self.source.get_batch(indices))
        labels = np.asarray(batch["label"], np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.mapping.index)):
            raise ClassMappingError(f"{getattr(self.source, 'name', 'the data')} has label {int(labels.max())} "
                                    f"beyond its {len(self.mapping.index)} classes")
        batch["label"] = self.mapping.index[labels]
        return batch

    def fingerprint(self) -> dict:
        fp = getattr(self.source, "fingerprint", None)
        base = fp() if callable(fp) else {"kind": type(self.source).__name__, "count": len(self.source)}
        return {**base, "label_mapping": self.mapping.index.tolist()}


def model_labelled(source, model_names: Sequence[str] | None, num_outputs: int | None, *,
                   class_order: str = "metadata", data: str = "--data", model: str = "the model") -> ModelLabelled:
    """``source`` with its labels mapped to the model's outputs by :func:`class_map` (an error if they cannot be)."""
    return ModelLabelled(source, class_map(data_classes(source), model_names, num_outputs, class_order=class_order,
                                           data=data, model=model))


def num_outputs(module, variables, source, key: str = "image") -> int:
    """The classifier's output count on ``source``'s inputs (shape inference only, nothing computed)."""
    import jax

    x = np.asarray(source.get_batch([0])[key][:1])
    return int(jax.eval_shape(module.apply, variables, x).shape[-1])


__all__ = ["CLASS_ORDERS", "ClassMap", "ClassMappingError", "ModelLabelled", "class_map", "data_classes",
           "model_labelled", "num_outputs"]
