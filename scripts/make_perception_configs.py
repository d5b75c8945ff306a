"""Write `configs/perception/<name>.json` for every released PIIP perception config this port supports.

Usage: python scripts/make_perception_configs.py [RELEASED_DIR]  (default: the copy of the official
configs in tests/fixtures/released_configs_perception). Each JSON is named after its official
config file and holds the backbone part (detectors / segmenters) or the whole classifier.
Unsupported configs are listed with the reason, and nothing is written for them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from piip_llava.conversion.perception import PerceptionConversionError, config_json, perception_config_from_file

ROOT = Path(__file__).resolve().parent.parent


def main(released_dir: Path) -> int:
    output_dir = ROOT / "configs" / "perception"
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(released_dir.rglob("*.py")):
        try:
            config, codebase = perception_config_from_file(str(path))
        except PerceptionConversionError as error:
            print(f"skipped {path.relative_to(released_dir)}: {error}")
            continue
        (output_dir / f"{path.stem}.json").write_text(config_json(config), encoding="utf-8")
        print(f"wrote configs/perception/{path.stem}.json ({codebase})")
    return 0


if __name__ == "__main__":
    default = ROOT / "tests" / "fixtures" / "released_configs_perception"
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
