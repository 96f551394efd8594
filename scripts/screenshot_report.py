"""Screenshot a `fastif visualize` report.html in headless Chromium and say whether it rendered.

Usage: python scripts/screenshot_report.py <report.html> [<screenshot.png>] [--browser chromium]
Exit status 0 when the page rendered (not blank), 1 when it looks blank, 2 when no browser ran.
Install Chromium on Debian/Ubuntu with: apt-get update && apt-get install -y chromium
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fastif.visualize import image_spread, screenshot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path, nargs="?")
    parser.add_argument("--browser", default="chromium")
    args = parser.parse_args()
    if shutil.which(args.browser) is None:
        print(f"{args.browser} is not installed (apt-get install -y chromium)", file=sys.stderr)
        return 2
    target = args.png or args.html.with_name(args.html.stem + "_screenshot.png")
    screenshot(args.html, target, browser=args.browser)
    spread, inked = image_spread(target)
    print(f"{target}: pixel std {spread:.3f}, {inked:.1%} non-white pixels")
    return 0 if spread > 0.02 and inked > 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
