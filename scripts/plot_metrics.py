"""Plot a run's metrics.jsonl to one PNG.

    python scripts/plot_metrics.py results/dpo [--out curves.png]
"""

import argparse
import sys

from megatron_dpo.logging.plots import plot_metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="FILE.png", default=None,
                        help="output image (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        out_path, _ = plot_metrics(args.run_dir, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
