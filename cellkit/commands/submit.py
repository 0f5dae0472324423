"""``python -m cellkit submit --pred PRED --thresholds thresholds.json --images DIR --out submission.csv``.

Post-processes each test image's predictions with the searched thresholds and options
(:func:`cellkit.postprocess.apply_predictions`) and writes the submission through
:func:`cellkit.submission.write_submission` (atomic; every image of ``--images`` listed, an empty ``predicted`` for an
image without a kept cell), then checks it with :func:`cellkit.submission.validate_submission`.

The store must have been predicted as the out-of-fold predictions the thresholds were fitted on: its inference
signature (passes, fusion, detections per image; :mod:`cellkit.predict`) must equal the thresholds' ``"inference"``
(the member count may differ). Otherwise nothing is written and the command exits with 2, naming what differs;
``--allow-inference-mismatch`` goes on with a warning.

The dataset (:mod:`cellkit.schema`: the store's ``meta.json`` records it, Sartorius without) decides the groups the
thresholds must have, the submission's column names and its RLE order. ``--coco-json`` also writes the kept masks
as a COCO results json.
"""
import sys

HELP = "post-process test predictions with thresholds.json and write a valid submission.csv"


def add_arguments(parser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR", help="test predictions store (cellkit.predictions)")
    parser.add_argument("--thresholds", required=True, metavar="JSON", help="thresholds.json from `cellkit search`")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of the test images")
    parser.add_argument("--out", required=True, metavar="CSV", help="submission.csv to write")
    parser.add_argument("--allow-inference-mismatch", action="store_true",
                        help="submit even when the store was predicted with other passes or fusion than the "
                             "thresholds were fitted on (a warning instead of an error)")
    parser.add_argument("--coco-json", metavar="JSON", help="also write the kept masks as a COCO results json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_inference(pred_dir, thresholds_path, doc, allow: bool) -> list[str]:
    """Compare the store's inference signature with the thresholds'; returns log lines (warnings).

    Raises:
        CellkitError: they differ (one line naming what), unless ``allow``.
    """
    from cellkit import predictions as P
    from cellkit.cli import CellkitError

    expected = doc.get("inference")
    try:
        actual = P.store_signature(P.read_meta(pred_dir))
    except FileNotFoundError:
        actual = None
    if expected is None:
        return [f"warning: {thresholds_path} carries no inference signature (an older cellkit's): the store's "
                f"passes and fusion are not checked"]
    if actual is None:
        return [f"warning: {pred_dir} has no inference signature (no meta.json): not checked"]
    diff = P.signature_difference(expected, actual)
    if not diff:
        return [f"inference: {P.describe_signature(actual)} (as the thresholds')"]
    message = (f"{pred_dir}: predicted otherwise than the out-of-fold predictions {thresholds_path} was fitted on: "
               f"{diff} (thresholds vs store); predict with `--like {thresholds_path}` or pass "
               f"--allow-inference-mismatch")
    if not allow:
        raise CellkitError(message)
    return [f"warning: {message}"]


def run(args) -> int:
    from tqdm import tqdm

    from cellkit import postprocess as pp
    from cellkit import predictions as P
    from cellkit.cli import CellkitError
    from cellkit.schema import schema_of
    from cellkit.submission import (check_store_ids, image_sizes, validate_submission, write_coco_results,
                                    write_submission)

    doc = pp.load_thresholds(args.thresholds)
    schema = schema_of(args.pred)
    thresholds, options = pp.validate_thresholds(doc["thresholds"], args.thresholds, schema.groups), doc["options"]
    log = [f"thresholds from {args.thresholds}: options image_class_vote={options['image_class_vote']} "
           f"rescore={options['rescore']} vote_min_score={options['vote_min_score']} "
           f"free_dropped={options['free_dropped']}"]
    log += [f"  {name:7} score >= {t['score']:.3f}  mask >= {t['mask']:.3f}  min_area {t['min_area']}"
            for name, t in thresholds.items()]  # in the groups' order (validate_thresholds)
    log += check_inference(args.pred, args.thresholds, doc, args.allow_inference_mismatch)
    print("\n".join(log), file=sys.stderr)
    sizes = image_sizes(args.images)
    ids = P.image_ids(args.pred)
    check_store_ids(ids, sizes, args.pred, args.images)
    masks, coco = {}, []
    for pred in tqdm(P.iter_dir(args.pred), total=len(ids), desc="submit", unit="image",
                     disable=args.no_progress):
        if (pred.height, pred.width) != sizes[pred.image_id]:
            raise CellkitError(f"{args.pred}/{pred.image_id}.npz: size {pred.height}x{pred.width} differs from the "
                               f"image's {sizes[pred.image_id][0]}x{sizes[pred.image_id][1]}")
        kept = pp.apply_predictions(pp.group_view(pred, schema), thresholds, groups=schema.groups, **options)
        masks[pred.image_id] = kept.rles()
        coco.append((pred.image_id, kept, pred.classes[kept.indices]))
    out = write_submission(masks, sorted(sizes), args.out, shape=sizes, header=schema.submission_columns,
                           rle_order=schema.rle_order)
    if args.coco_json:
        print(f"wrote {write_coco_results(coco, args.coco_json)} (COCO results)")
    problems = validate_submission(out, args.images, schema.submission_columns, schema.rle_order)
    if problems:  # cannot happen for masks from apply_predictions; never hand in an invalid file silently
        raise CellkitError(f"{out}: written but invalid: {problems[0]} ({len(problems)} problem(s))")
    print(f"wrote {out}: {sum(map(len, masks.values()))} masks, {len(sizes)} images "
          f"({sum(not v for v in masks.values())} without cells); valid")
    return 0
