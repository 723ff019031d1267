"""`make demo`: drop generated product shots into the sample config's inboxes and run `bgwatch run --once`.

Needs no network and no model weights: the shots are generated here, and with no rembg weights in the
model home the `auto` mask engine picks the classical (OpenCV) engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bgwatch.cli import main as cli_main

# inbox folder (as in config.yaml) -> how many shots, and the first seed
DROPS = {"inbox/cleanup": (2, 0), "inbox/white": (2, 10), "inbox/soften": (1, 20), "inbox/gradient": (2, 30)}


def main(argv: list[str] | None = None) -> int:
    from bgwatch.config import load_config
    from bgwatch.samples import write_samples

    config = Path(argv[0] if argv else "config.yaml")
    root = config.parent
    # The demo plays the studio: it makes the sample's inbox folders (the daemon never creates an inbox; a
    # missing one would be reported as a share not mounted), the replace one left empty (SDXL needs weights).
    for inbox in load_config(config, env={}).inboxes:
        inbox.path.mkdir(parents=True, exist_ok=True)
    for folder, (count, seed) in DROPS.items():
        written = write_samples(root / folder, count, seed=seed)
        print(f"dropped {len(written)} shot(s) into {folder}/")
    return cli_main(["run", "--once", "-c", str(config)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
