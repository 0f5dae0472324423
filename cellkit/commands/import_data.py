"""``cellkit import {csv,coco,masks} SOURCE ... --out DIR``: a dataset in its own format -> the kit's layout."""


def parse_size(text: str) -> tuple[int, int]:
    """``"520x704"`` -> ``(520, 704)`` (HEIGHTxWIDTH; an argparse type, shared by ``cellkit synth``)."""
    import argparse

    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 520x704, got {text!r}") from None
    return height, width


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_arguments(parser) -> None:
    parser.add_argument("format", choices=("csv", "coco", "masks"),
                        help="csv: one row per instance; coco: COCO json(s); masks: <id>/images/<id>.png + "
                             "<id>/masks/*.png")
    parser.add_argument("source", nargs="+", metavar="SOURCE",
                        help="the CSV, the COCO json file(s), or the mask folder's root")
    parser.add_argument("--out", required=True, help="new dataset directory (must be absent or empty)")
    parser.add_argument("--images", help="image directory (csv, coco)")
    parser.add_argument("--test-images", help="test images: a directory of <id>.<ext> (or of <id>/images/<id>.png)")
    parser.add_argument("--class-column", default="cell_type", help="csv: the class column (default cell_type)")
    parser.add_argument("--id-column", default="id", help="csv: the image id column (default id)")
    parser.add_argument("--annotation-column", default="annotation",
                        help="csv: the mask-string column (default annotation)")
    parser.add_argument("--classes", type=_names,
                        help="comma-separated class names in category-id order (default: those found, sorted; "
                             "masks: one name, default cell)")
    parser.add_argument("--rle-order", choices=("row", "column"),
                        help="pixel order of the dataset's mask strings, read (csv) and written in its submission "
                             "(default: row; masks: column)")
    parser.add_argument("--group-pattern",
                        help="regex whose first capture group, searched in the image id, is the image's group "
                             "(LIVECell: '^([A-Za-z0-9]+)_'); default: the group is the class")
    parser.add_argument("--groups", type=_names, help="comma-separated group names in order (default: found, sorted)")
    parser.add_argument("--size", type=parse_size, help="HEIGHTxWIDTH every image must have (default: sizes may vary)")
    parser.add_argument("--submission-columns", type=_names,
                        help="the submission's two columns (default id,predicted; masks: ImageId,EncodedPixels)")
    parser.add_argument("--name", default="dataset", help="the dataset's name, recorded in dataset.json")


def run(args) -> int:
    from cellkit import importers as I

    common = dict(size=args.size, test_images=args.test_images, name=args.name)
    if args.submission_columns:
        common["submission_columns"] = args.submission_columns
    if args.format == "masks":
        if len(args.source) != 1 or (args.classes and len(args.classes) != 1) or args.group_pattern:
            raise ValueError("import masks: one SOURCE folder, at most one --classes name, no --group-pattern")
        schema = I.import_masks(args.source[0], args.out, class_name=(args.classes or ("cell",))[0],
                                rle_order=args.rle_order or "column", **common)
    else:
        if not args.images:
            raise ValueError(f"import {args.format}: --images DIR is required")
        common.update(group_pattern=args.group_pattern, groups=args.groups, rle_order=args.rle_order or "row")
        if args.format == "csv":
            if len(args.source) != 1:
                raise ValueError("import csv: one SOURCE CSV")
            schema = I.import_csv(args.source[0], args.images, args.out, class_column=args.class_column,
                                  id_column=args.id_column, annotation_column=args.annotation_column,
                                  classes=args.classes, **common)
        else:
            if args.classes:
                raise ValueError("import coco: the classes are the json's categories (no --classes)")
            schema = I.import_coco(args.source, args.images, args.out, **common)
    print(f"wrote {args.out}: classes {', '.join(schema.classes)}; groups {', '.join(schema.groups)} "
          f"(by {schema.group_by}); {schema.channels} channel(s), {schema.bit_depth}-bit, RLE {schema.rle_order}-major")
    return 0
