"""The reward-data loop's human step: ``zr annotate`` writes the scoring page and imports its answers.

``page.py`` writes the self-contained HTML page (``page.js`` is its script); ``answers.py`` merges
the downloaded JSONL files into records for ``zr validate-data`` and ``zr train-reward``.
"""

from __future__ import annotations

import argparse


def cli_run(args: argparse.Namespace) -> int:
    from zr_diffusion.rubric import DEFAULT_DIMENSIONS, check_dimensions

    dimensions = check_dimensions(args.dimensions or DEFAULT_DIMENSIONS)
    if args.answers:
        from zr_diffusion.annotate.answers import import_answers

        s = import_answers(args.folder, args.answers, args.out, dimensions)
        print(
            f"annotate: {s.records} scored records from {s.annotators} annotator file(s), {s.images_scored} of "
            f"{s.images} images scored ({', '.join(f'{d}: {n}' for d, n in s.per_dimension.items())}) in {s.path}\n"
            f"  next: zr validate-data {s.path}; then train-reward with data.train={s.path}"
        )
        return 0
    from zr_diffusion.annotate.page import write_page

    page = write_page(args.folder, dimensions, args.out, args.link_images)
    print(
        f"annotate: page {page} ({len(dimensions)} dimensions: {', '.join(dimensions)}); open it in a browser,\n"
        f"  score, download the JSONL, then: zr annotate {args.folder} --import ANSWERS.jsonl [MORE.jsonl ...]"
    )
    return 0
