"""``python -m cellkit validate SUB.csv --images DIR``: check a submission against a folder of test images.

Exit 0 with a one-line summary when the submission is valid; otherwise exit 1 with one line per problem on stdout
(naming the 1-based CSV line, header = line 1, and the image id) and a count on stderr. Checks: header, unknown
and missing ids, bad RLE, runs out of the image's bounds, overlapping masks of one image (see
:mod:`cellkit.submission`).
"""
import sys

HELP = "check a submission.csv against a folder of test images"


def add_arguments(parser) -> None:
    parser.add_argument("submission", help="the submission CSV (columns id,predicted)")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder of the test images (png/tif/jpg; ids are file stems, sizes from headers)")
    parser.add_argument("--dataset", metavar="PATH",
                        help="where the dataset's schema is recorded (its columns and RLE order): a dataset or run "
                             "directory, a prediction store or a thresholds.json (default: the folder holding "
                             "--images; Sartorius without a record)")


def run(args) -> int:
    from pathlib import Path

    from cellkit.schema import schema_of
    from cellkit.submission import check_submission

    schema = schema_of(args.dataset or Path(args.images).resolve().parent)
    report = check_submission(args.submission, args.images, schema.submission_columns, schema.rle_order)
    if report.problems:
        for line in report.problems:
            print(f"{args.submission}: {line}")
        print(f"{args.submission}: INVALID: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.submission}: OK: {report.n_rows} rows, {report.n_masks} masks, {report.n_images} images "
          f"({report.n_empty_images} without cells)")
    return 0
