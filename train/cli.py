"""Flag parsing shared by the training programs."""

from __future__ import annotations

import os
import re
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """Parse absl flags; an unknown config field or a bad value exits with a one-line error."""
    for index, arg in enumerate(argv):
        path = None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and index + 1 < len(argv):
            path = argv[index + 1]
        if path is not None and not os.path.isfile(path):
            print(f"error: config file not found: {path}", file=sys.stderr)
            sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        # ml_collections raises AttributeError(KeyError("'name'\nDid you mean ...")).
        text = str(error).replace("\\n", "\n").replace("\\", "")
        names = re.findall(r"'([A-Za-z0-9_]+)'", text)
        suggestion = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
        overrides = [arg for arg in argv if arg.startswith("--config.")]
        field = names[0] if names else text
        hint = f' Did you mean "{suggestion.group(1)}"?' if suggestion else ""
        print(
            f"error: the config has no field {field!r} (in {' '.join(overrides)}).{hint} "
            "See bt_jax.training.settings.default_config for the fields.",
            file=sys.stderr,
        )
        sys.exit(2)
    # absl raises ValueError for a value given to a boolean's --noNAME form.
    except (flags.Error, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
