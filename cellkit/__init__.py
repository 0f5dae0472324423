"""cellkit: cell instance segmentation for the Kaggle Sartorius competition on detectron2.

Modules, one stage each (see README): ``rle`` (mask strings), ``data`` (dataset dicts), ``synth`` (demo data),
``folds``, ``metric``, ``submission``; model stages live in ``config``, ``modeling``, ``train``, ``tta``,
``predictions``, ``postprocess`` and ``search``; ``audit`` checks the labels (duplicates, overlaps, tiny masks, and
with out-of-fold predictions missed and spurious cells).
"""

__version__ = "0.1.0"

#: (height, width) of every Sartorius image.
SHAPE = (520, 704)

#: The competition's cell types, in category-id order (0, 1, 2).
CELL_TYPES = ("shsy5y", "astro", "cort")

