"""Label audit of a competition ``train.csv``: which annotations and which images look wrong.

Noisy labels cost everyone: the Sartorius train data has partly annotated images, duplicated annotations and broken
masks, and the 7th place removed the images a trained model found under-annotated. This module flags suspicious
annotations from the labels alone and, given out-of-fold predictions (a :mod:`cellkit.predictions` store, e.g.
``cellkit predict --fold``), from a model's view of them, and ranks the images by one score.

Flags (``kind``; one row of ``instances.csv`` each; masks are compared by pixel IoU, never by box):

from the labels alone

- ``duplicate``: an annotation with mask IoU >= ``duplicate_iou`` (0.9) with an earlier annotation of the same image
  (its ``partner_row``): the same cell annotated twice. The later row is flagged; the earlier one is not.
- ``overlap``: two annotations whose intersection covers >= ``overlap_ios`` (0.5) of the *smaller* mask (intersection
  over smaller, IoS) but that are not duplicates: one cell drawn inside another, or one cell annotated twice with
  different outlines. The smaller mask is flagged. Legitimate touching cells of this data overlap by a few pixels
  (median 0.4-2 % of the covered pixels), far below 0.5 of a mask.
- ``empty``: an annotation without any pixel.
- ``tiny``: an annotation of ``0 < area < min_area[cell type]`` pixels (:data:`DEFAULT_MIN_AREA`: shsy5y 30, astro 80,
  cort 40). The real train.csv's smallest masks are 30 / 37 / 33 px and its 1st percentiles 51 / 109 / 62 px
  (shsy5y / astro / cort), so these thresholds catch fragments (astro fragments are larger) and nothing typical.

with predictions (``match_iou`` 0.5; a prediction is *confident* when its score is >= ``AuditSpec.confident_score``,
by default the class's score threshold of ``--thresholds``, else the seed's 0.5; its mask is binarised at the
class's pixel threshold and must keep that file's ``min_area`` pixels, at least 1)

- ``missed``: a confident prediction that no annotation matches (best IoU < ``match_iou``) and that lies mostly off the
  annotations (less than ``missed_coverage`` = 0.5 of its pixels on any annotation): a cell the annotator left out.
  A lower-scored prediction covering >= ``pred_nms_ios`` (0.5) of its own pixels with a higher-scored confident one
  is a detector duplicate and is not considered.
- ``spurious``: an annotation that no confident prediction touches (best IoU < ``misplaced_iou`` = 0.1): nothing
  there in the model's view.
- ``misplaced``: an annotation whose best confident prediction overlaps it but does not match it
  (``misplaced_iou <= IoU < match_iou``): a shifted or badly outlined mask.

Image score (``audit.csv`` column ``score``; higher is worse; 0 for an image without any flag), with ``n`` the number
of non-empty annotations (at least 1) and ``m`` the number of ``missed`` predictions::

    label_score = (2 * n_duplicate + 1 * n_overlap + 1 * n_empty + 1 * n_tiny) / n
    pred_score  = 1.0 * excess(m / (n + m)) + 0.5 * excess(n_spurious / n) + 1.0 * excess(n_misplaced / n)
    score       = label_score + pred_score          (pred_score = 0 without predictions)

Each term is a fraction (of the image's annotations, or of its cells for ``missed``), so a score of 0.2 reads as
"about a fifth of this image's labels are suspect", comparable between an image of 15 cort cells and one of 700
shsy5y cells. A duplicate weighs double: it is certain (the same cell twice), where an overlap or a small mask may be
right. ``excess`` (:func:`excess`) removes the model's own error rates: even on perfect labels an imperfect model
misses some cells, finds some that are not there and outlines some badly, at rates that differ by cell type. So each
prediction-based fraction ``f`` of ``d`` items counts only as far as it exceeds its cell type's baseline ``b`` (the
median fraction over the audited images of that type with predictions, when there are at least
:data:`MIN_BASELINE_IMAGES`; else 0) by more than chance: ``excess(f) = max(f - b - z * sqrt(b (1 - b) / d), 0)``
with ``z = AuditSpec.noise_z`` = 2 standard errors, so that an image of 15 cells is not flagged for the one extra
miss chance gives it. Spurious labels weigh half: a label where the model sees no cell is as often a cell the model
misses. The weights are ``AuditSpec.weights`` (:data:`DEFAULT_WEIGHTS`). On planted defects
(``benchmarks/bench_audit.py``) this ranks defective images above clean ones with the ROC AUC of
``benchmarks/RESULTS.md``.

cleanlab (optional): the ``cleanlab_*`` columns are ObjectLab's overlooked / bad-location / swap scores of each
image, by cleanlab's public API (:mod:`cellkit.audit.cleanlab`, which also says where they do not fit); they are not
part of ``score``. Without cleanlab they stay empty (with a warning) and nothing else changes.

Efficiency: masks stay run-length encoded (:class:`MaskRuns`, row-major runs); candidate pairs are the pairs whose
bounding boxes (from the runs) overlap (:func:`box_pairs`), and only their intersections are computed, from the runs
(:func:`pair_intersections`; :mod:`cellkit.geometry`). The labels-only
audit of the real train.csv (392 images, 32,105 masks) takes under a second on one core, with predictions of every
image about 20 s (``benchmarks/RESULTS.md``). Images are processed one at a time (tqdm bar); only their counts, flags
and boxes are kept.

Conventions: mask strings are the competition's RLE (row-major, 1-indexed starts, :mod:`cellkit.rle`); ``row`` and
``partner_row`` are 0-based data rows of the train CSV as :func:`cellkit.data.read_train_csv` indexes them (CSV line
= row + 2); ``pred_index`` indexes an image's predictions in the order of its ``.npz``; boxes are ``x0, y0, x1, y1``
pixels, end exclusive.

Modules: :mod:`~cellkit.audit.spec` (constants, columns, :class:`AuditSpec`, the image score),
:mod:`~cellkit.audit.labels` (flags from the labels
alone), :mod:`~cellkit.audit.predictions` (flags from predictions), :mod:`~cellkit.audit.cleanlab` (the optional
cleanlab columns), :mod:`~cellkit.audit.core` (:func:`audit`), :mod:`~cellkit.audit.report` (files, exclusion lists).
"""
from cellkit.audit.cleanlab import (CLEANLAB_COLUMNS, _CleanlabImage, cleanlab_format, cleanlab_image_scores,
                                    cleanlab_matrices)
from cellkit.audit.core import audit, has_predictions
from cellkit.audit.labels import ImageLabels, LabelFlags, label_flags
from cellkit.geometry import MaskRuns, box_pairs, overlapping_pairs, pair_intersections
from cellkit.audit.predictions import PredictionFlags, prediction_flags
from cellkit.audit.report import (AUDIT_NAME, INSTANCES_NAME, SUMMARY_NAME, AuditResult, exclusion_ids, read_audit,
                                  write_audit)
from cellkit.audit.spec import (DEFAULT_MIN_AREA, DEFAULT_WEIGHTS, IMAGE_COLUMNS, INSTANCE_COLUMNS, KINDS,
                                LABEL_KINDS, MIN_BASELINE_IMAGES, PREDICTION_KINDS, RATE_KINDS, AuditSpec,
                                apply_baselines, excess, image_fractions, image_score)

__all__ = [
    "DEFAULT_MIN_AREA", "DEFAULT_WEIGHTS", "MIN_BASELINE_IMAGES", "KINDS", "LABEL_KINDS", "PREDICTION_KINDS",
    "IMAGE_COLUMNS", "INSTANCE_COLUMNS", "AUDIT_NAME", "INSTANCES_NAME", "SUMMARY_NAME", "AuditSpec", "MaskRuns",
    "RATE_KINDS", "box_pairs", "pair_intersections", "overlapping_pairs", "LabelFlags", "label_flags", "ImageLabels",
    "PredictionFlags", "prediction_flags", "image_fractions", "excess", "image_score", "apply_baselines",
    "CLEANLAB_COLUMNS", "cleanlab_matrices", "cleanlab_format", "cleanlab_image_scores", "AuditResult",
    "has_predictions", "audit", "write_audit", "read_audit", "exclusion_ids",
]
