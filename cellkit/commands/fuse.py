"""``python -m cellkit fuse --pred STORE --pred STORE [...] --out FUSED [--iou 0.5]``.

Weighted mask fusion (:func:`cellkit.predict.fuse_stores`) of stores that different models predicted over the same
images with the same passes: the same predictions as ``cellkit predict --run A --run B --fusion wmf``, from stores
made separately. The fused store's inference signature has fusion ``wmf``.
"""
HELP = "fuse prediction stores of several models by weighted mask fusion into one store"


def add_arguments(parser) -> None:
    parser.add_argument("--pred", required=True, action="append", metavar="STORE",
                        help="a predictions store of one model (or a box-first ensemble); give two or more")
    parser.add_argument("--out", required=True, help="the fused predictions store")
    parser.add_argument("--iou", type=float, default=0.5, help="mask IoU at which instances are the same cell")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from cellkit.predict import fuse_stores

    result = fuse_stores(args.pred, args.out, iou=args.iou, progress=not args.no_progress)
    print(f"fuse: {len(args.pred)} stores, {result['written']} image(s) written, {result['skipped']} already there "
          f"-> {args.out}")
    return 0
