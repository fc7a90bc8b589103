"""Beyond single labels: compositional explanations, label significance and label metrics.

* :func:`compositional`: best formula of concepts per unit (beam search or exact).
* :class:`SparseMasks`: bit-packed, block-sparse masks the search runs on.
"""

from jaxdissect.explain.compositional import Explanation, compositional, formula_text
from jaxdissect.explain.packed import SparseMasks, pack_bits

__all__ = ["Explanation", "SparseMasks", "compositional", "formula_text", "pack_bits"]
