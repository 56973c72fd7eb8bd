"""The `entangle` command's launcher (distribution `entangle-po`): imports the `entangle` package, so that a
package that cannot be imported (another project named `entangle` installed beside this one, a missing
dependency) is one line on stderr and exit 2, not a traceback."""

import sys


def main() -> int:
    try:
        from entangle.cli import main as run
    except ImportError as e:
        print(f"entangle: error: {e}", file=sys.stderr)
        return 2
    return run()


if __name__ == "__main__":
    sys.exit(main())
