#!/usr/bin/env python
"""Peak memory of fusing two ~1 GB members (issue 5's target: <= 3 * S above the interpreter, S = one member).

Two MLPs 3072 -> w -> w -> 10 with w = 14336 (about 1.0 GB each) are generated and merged in a fresh process,
as in fusion_cost.py (whose machinery this reuses); the peak RSS above an idle interpreter is compared with
the size S of one member file.

    python benchmarks/memory.py [--width 14336]
    python benchmarks/memory.py --quick --out /tmp/q      # w = 256

Writes benchmarks/results/memory.md and .json.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from _common import MB, cli, md_table, stamp, write_results
from fusion_cost import measure_width


def main() -> None:
    p = cli(__doc__, "w = 256")
    p.add_argument("--width", type=int, default=14336)
    args = p.parse_args()
    width = 256 if args.quick else args.width
    st = stamp()
    with tempfile.TemporaryDirectory() as tmp:
        row = measure_width(width, Path(tmp), 1, print)
    member = row["in_bytes"] / 2
    ratio = row["merge_rss_above_idle"] / member
    text = "\n".join([
        "# Peak memory of merging two ~1 GB members",
        "",
        f"- Members: two MLPs 3072 -> {width} -> {width} -> 10, float32, one file each of "
        f"S = {member / MB:.0f} MB. `onnxfuse.fuse([a, b], 'nt', output=...)` in a fresh process; peak RSS "
        "(VmHWM) minus the RSS of the interpreter after importing numpy, onnx and onnxfuse.",
        "- Reproduce: `python benchmarks/memory.py`. Target (issue 5): peak <= 3 S.",
        "",
        *md_table(["S MB", "merge s", "peak RSS above idle MB", "peak / S", "target met"],
                  [[f"{member / MB:.0f}", f"{row['merge_s']:.2f}", f"{row['merge_rss_above_idle'] / MB:.0f}",
                    f"{ratio:.2f}", "yes" if ratio <= 3 else "NO"]], "rrrrl"),
        "",
    ])
    print(text)
    write_results(args.out, "memory", text, {"width": width, "member_bytes": member, "row": row}, st)


if __name__ == "__main__":
    main()
